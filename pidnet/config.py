"""One typed config schema for every script: defaults here, a YAML file over them, ``--set`` last.

Unknown keys and wrong types are ``ConfigError``s that name the key and the closest valid one.
The free-form ``user`` section is handed to the hooks untouched.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class Bounds:
    """The allowed values of a number: ``low``/``high`` inclusive, ``above``/``below``
    exclusive. A bound may name a sibling key of the same section (``"epochs"``)."""

    low: float | str | None = None
    high: float | str | None = None
    above: float | None = None
    below: float | None = None

    def describe(self, section: Any = None, prefix: str = "") -> str:
        def show(bound: float | str) -> str:
            if isinstance(bound, str):
                return (f"{prefix}{bound} ({getattr(section, bound)})" if section
                        else f"{prefix}{bound}")
            return str(bound)
        low = f"[{show(self.low)}" if self.low is not None else (
            f"({show(self.above)}" if self.above is not None else "(-inf")
        high = f"{show(self.high)}]" if self.high is not None else (
            f"{show(self.below)})" if self.below is not None else "inf)")
        return f"{low}, {high}"

    def allows(self, value: float, section: Any = None) -> bool:
        def resolve(bound: float | str) -> float:
            return getattr(section, bound) if isinstance(bound, str) else bound
        return ((self.low is None or value >= resolve(self.low))
                and (self.high is None or value <= resolve(self.high))
                and (self.above is None or value > self.above)
                and (self.below is None or value < self.below))

    def check(self, key: str, value: Any, section: Any = None, prefix: str = "") -> None:
        """``ConfigError`` naming ``key``, the value and the allowed range when ``value`` (or
        an item of a list) falls outside; ``None`` passes (optional keys)."""
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not self.allows(item, section):
                raise ConfigError(f"config key '{key}' must be in "
                                  f"{self.describe(section, prefix)}, got {value!r}")


def ranged(default: Any, low: float | str | None = None, high: float | str | None = None, *,
           above: float | None = None, below: float | None = None) -> Any:
    """A field with its default and its allowed values (checked by ``load_config``)."""
    return field(default=default, metadata={"bounds": Bounds(low, high, above, below)})


# Allowed values live next to each field (``ranged``); ``python -m pidnet.config`` lists them.
@dataclass
class CalibConfig:
    method: str = "entropy"
    methods: list[str] = field(default_factory=lambda: ["max", "percentile", "mse", "entropy"])
    num_batches: int = ranged(16, 1)
    percentile: float = ranged(99.99, above=0, high=100)   # calib.method: percentile's
    # what calibrate.py compares when percentile is in methods, one row each
    percentiles: list[float] = field(
        default_factory=lambda: [99.0, 99.5, 99.9, 99.99, 99.999],
        metadata={"bounds": Bounds(above=0, high=100)})
    # Post-training steps beyond ranges (README "PTQ steps"), used wherever a model is
    # calibrated: calibrate.py, QAT calib and stats starts, sensitivity and export from float
    equalize: bool = False          # fold batch norms, equalize layers joined by a ReLU (before)
    bias_correction: bool = False   # subtract each layer's mean output shift (after ranges)
    weight_rounding: str = "nearest"   # nearest | adaround (learned per layer, after ranges)
    # what calibrate.py adds to the best range method, one row each and one with all
    steps: list[str] = field(default_factory=list)
    step_batches: int = ranged(4, 1)   # calib batches AdaRound and bias correction learn from
    adaround_iterations: int = ranged(1000, 1)      # per layer (AIMET: 10000)
    adaround_reg: float = ranged(0.01, above=0)     # weight of the rounding regulariser
    adaround_beta: list[float] = field(               # annealed from the first to the second
        default_factory=lambda: [20.0, 2.0], metadata={"bounds": Bounds(above=0)})
    adaround_warm_start: float = ranged(0.2, 0, below=1)   # share of iterations unregularised


@dataclass
class QuantConfig:
    """Where fake-quant modules go and how many bits they use."""

    # INT8 and below: what TensorRT's and onnxruntime's integer kernels run
    weight_bits: int = ranged(8, 2, 8)    # per output channel when per_channel
    act_bits: int = ranged(8, 2, 8)       # per tensor
    per_channel: bool = True        # false: refused where export folds batch norm (README)
    weight_range: str = "max"       # max | mse: the clipped max nearest the float weights
    residual: bool = True           # skip input of residual adds, inputs of the gated fusions
    exclude: list[str] = field(default_factory=list)   # layers kept float: exact names or globs
    num_bins: int = ranged(2048, 256, 1 << 20)   # histogram bins for activation statistics


@dataclass
class TrainConfig:
    """Float training (``qat_train.py --mode float``)."""

    epochs: int = ranged(30, 1)
    lr: float = ranged(0.01, above=0)
    momentum: float = ranged(0.9, 0, below=1)
    weight_decay: float = ranged(5e-4, 0)
    schedule: str = "poly"          # poly | cosine | constant
    poly_power: float = ranged(0.9, above=0)
    freeze_bn_epochs: int = ranged(0, 0, "epochs")   # last epochs with batch norm frozen (a
                                                     # fine-tune that matches QAT's)
    precise_bn: bool = False        # when batch norm freezes after live epochs, its
                                    # statistics are first set from one pass over the train
                                    # split (not the running average of the last few dozen
                                    # batches); a run frozen throughout keeps its model's
    # ``user:`` keys the hooks see in the frozen phase (the last freeze_bn_epochs), over the
    # config's: its train loader is built again with them, e.g. crop_size at the size the
    # model is evaluated at (FixRes: train on crops, finish on whole images); {}: one loader
    final_phase_user: dict[str, Any] = field(default_factory=dict)
    log_interval: int = ranged(20, 0)   # steps between log lines; 0: none
    ema_decay: float = ranged(0.0, 0, below=1)   # exponential moving average of the weights
                                     # (and batch-norm statistics) per step; 0: off. The
                                     # average is evaluated, kept and saved as the model
                                     # (last.pt also holds the live weights, to resume)


@dataclass
class QatConfig:
    """Quantization-aware training (``qat_train.py --mode calib|stats|direct``). Zero epochs
    is an error: the untrained quantized model is what calibrate.py saves."""

    epochs: int = ranged(3, 1)
    lr: float = ranged(2e-4, above=0)   # about 1% of the float learning rate (NVIDIA's recipe)
    schedule: str = "cosine"
    freeze_bn_epochs: int = ranged(1, 0, "epochs")       # last epochs with batch norm frozen
    freeze_ranges_epochs: int = ranged(1, 0, "epochs")   # last epochs with ranges frozen
    range_momentum: float = ranged(0.9, 0, below=1)  # stats: moving average of the ranges
    stats_range: str = "max"        # stats: the starting range from the observed histogram
                                    # (max: the raw max; percentile | mse | entropy: tighter),
                                    # tracked as the batch max scaled by start / observed max
    stats_recalibrate: str = "auto"   # stats: when the ranges freeze, set them once more by
                                      # stats_range on the trained network's float statistics
                                      # (always | never; auto: at 8-bit activations, where float
                                      # statistics describe what the quantizers see)
    direct_init: str = "auto"       # direct: lsq (2 mean|x| / sqrt(Q_P) on the first calib
                                    # batch, Esser et al. 2020) | fixed (direct_init_amax;
                                    # gates at their known range, 1) | auto (lsq at 8-bit
                                    # activations, fixed below)
    direct_init_amax: float = ranged(4.0, above=0)   # direct, fixed: data-free starting range
    learn_weight_ranges: bool = False   # every mode: weight step sizes learned too (LSQ)
    track_weight_ranges: bool = False   # every mode: weight ranges set again from the current
                                        # weights (quant.weight_range) before every forward;
                                        # learned weight steps are not tracked
    range_lr_scale: float = ranged(10.0, above=0)    # learning rate of learned ranges / qat.lr
    log_interval: int = ranged(20, 0)


@dataclass
class SensitivityConfig:
    """``sensitivity_analysis.py``: per-layer sweep and the float-layer selection."""

    tolerance: float = ranged(0.5, 0)   # allowed drop from float, in metric units (mIoU points)
    direction: str = "disable_one"  # disable_one (only that layer float) | enable_one
    num_batches: int | None = ranged(None, 1)   # a fixed subset of the val split; null: all
    output_file: str = "sensitivity_model.pt"   # the selected model; relative to output_dir
    max_float_layers: int | None = ranged(None, 0)   # null: any number, short of every layer
    # the float model the tolerance is measured against: float weights of the model the user
    # started from; null: the float weights a quantized checkpoint records (its config's
    # model_path, followed through checkpoints made from checkpoints), else the model itself
    # with quantizers off (it was quantized here from float weights)
    reference: str | None = None


@dataclass
class ExportConfig:
    """``export_onnx.py``: the ONNX graphs, their check in onnxruntime and their latency."""

    opset: int = ranged(17, 13, 20)
    target: str = "tensorrt"        # tensorrt | onnxruntime (chosen before calibration and QAT)
    input_size: list[int] | None = ranged(None, 1)   # [H, W]; null: the val loader's first batch
    batch: int = ranged(1, 1)
    dynamic_batch: bool = False
    # quality gate, in the metric's units: onnxruntime INT8 may score at most this much worse
    # than PyTorch fake-quant on the eval batches (exit 3 after writing results)
    max_metric_drop: float = ranged(0.3, 0)
    # optional second gate on the argmax agreement, onnxruntime vs PyTorch (always reported);
    # null: off. Rounding flips alone move 0.7-1% of a deep quantized network's pixels
    min_agreement: float | None = ranged(None, 0, 1)
    # layer check: a tensor with more than this share of elements more than one quantization
    # step off is where the graph departs from PyTorch (named in the log and results.json)
    max_step_mismatch: float = ranged(0.01, 0, 1)
    eval_batches: int | None = ranged(4, 1)      # val batches for the check; null: all
    threads: int = ranged(2, 1)                  # onnxruntime intra-op threads for latency
    latency_runs: int = ranged(20, 3)            # timed runs per graph (interleaved)


@dataclass
class BatchConfig:
    """What the hooks' loaders yield: ``(inputs, targets)`` pairs, or dicts whose inputs and
    targets sit under these keys."""

    inputs: str | None = None       # key of the inputs in a dict batch
    targets: str | None = None      # key of the targets in a dict batch


@dataclass
class Config:
    hooks: str = "my_model.py"
    model_path: str | None = None
    strict_load: bool = True        # false: load only the tensors whose name and shape match
    data_path: str | None = None
    output_dir: str | None = None
    seed: int = ranged(0, 0)
    device: str = "auto"            # auto | cpu | cuda
    metric: str | None = None       # key of evaluate()'s dict; null: miou if present, else first
    # which of the model's outputs is the prediction (export, the export's check): a dict key
    # or a sequence index; null: the tensor itself, a dict's only tensor or 'out', a
    # sequence's only item (a hooks file may define get_prediction(outputs) instead)
    prediction: str | int | None = None
    batch: BatchConfig = field(default_factory=BatchConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    user: dict[str, Any] = field(default_factory=dict)


CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "train.schedule": ("poly", "cosine", "constant"),
    "qat.schedule": ("poly", "cosine", "constant"),
    "calib.method": ("max", "percentile", "mse", "entropy"),
    "calib.methods": ("max", "percentile", "mse", "entropy"),
    "qat.stats_range": ("max", "percentile", "mse", "entropy"),
    "qat.direct_init": ("auto", "lsq", "fixed"),
    "qat.stats_recalibrate": ("auto", "always", "never"),
    "sensitivity.direction": ("disable_one", "enable_one"),
    "export.target": ("tensorrt", "onnxruntime"),
    "quant.weight_range": ("max", "mse"),
    "calib.weight_rounding": ("nearest", "adaround"),
    "calib.steps": ("equalize", "bias_correction", "adaround"),
}
NON_EMPTY = ("calib.methods", "calib.percentiles", "sensitivity.output_file")
LENGTHS = {"export.input_size": 2, "calib.adaround_beta": 2}
# The original README's flat keys and where they live now.
LEGACY_KEYS: dict[str, str] = {"tolerance": "sensitivity.tolerance",
                               "output_file": "sensitivity.output_file"}


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' must be {_describe(hint)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)   # YAML 1.1 reads 1e-4 (no dot) as a string
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"config key '{key}' must be {_describe(hint)}, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in (typing.get_args(hint) or (hint,))]
    words = {"NoneType": "null", "int": "an integer", "float": "a number", "str": "a string",
             "bool": "true or false", "list": "a list", "dict": "a mapping"}
    return " or ".join(words.get(n, n) for n in names)


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'"
                              + _suggest(full, [f"{prefix}{n}" for n in names]))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' must be a section (mapping), got {value!r}")
            kwargs[key] = _build(hint, value, f"{full}.")
        else:
            kwargs[key] = _check_type(value, hint, full)
            values = kwargs[key] if isinstance(kwargs[key], list) else [kwargs[key]]
            bad = [v for v in values if full in CHOICES and v not in CHOICES[full]]
            if bad:
                raise ConfigError(f"config key '{full}' must be one of "
                                  f"{', '.join(CHOICES[full])}, got {bad[0]!r}")
            if full in NON_EMPTY and not values:
                raise ConfigError(f"config key '{full}' must not be empty")
            if full in LENGTHS and kwargs[key] is not None and len(values) != LENGTHS[full]:
                raise ConfigError(f"config key '{full}' must hold {LENGTHS[full]} values, "
                                  f"got {kwargs[key]!r}")
    section = cls(**kwargs)
    check_bounds(section, prefix)
    return section


def check_bounds(section: Any, prefix: str = "") -> None:
    """Every field of ``section`` that carries ``Bounds`` holds an allowed value."""
    for f in dataclasses.fields(section):
        bounds = f.metadata.get("bounds")
        if bounds is not None:
            bounds.check(f"{prefix}{f.name}", getattr(section, f.name), section, prefix)


def all_bounds(cls: type | None = None, prefix: str = "") -> dict[str, Bounds]:
    """Every key with allowed values, by its dotted name (for the docs and the tests)."""
    found: dict[str, Bounds] = {}
    for f in dataclasses.fields(cls or Config):
        hint = typing.get_type_hints(cls or Config)[f.name]
        if dataclasses.is_dataclass(hint):
            found.update(all_bounds(hint, f"{prefix}{f.name}."))
        elif "bounds" in f.metadata:
            found[f"{prefix}{f.name}"] = f.metadata["bounds"]
    return found


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then each ``KEY=VALUE`` of ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, "
                              f"not a {type(loaded).__name__}")
        data = loaded or {}
    for legacy, new in LEGACY_KEYS.items():
        if legacy in data:
            _set_path(data, new, data.pop(legacy))
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_path(data, LEGACY_KEYS.get(key, key), value)
    return _build(Config, data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, so the run can be reproduced from its folder."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _type_name(hint: Any) -> str:
    """``int | None`` -> ``int or null``, ``list[float]`` -> ``list of float``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "mapping"
    return {"NoneType": "null"}.get(hint.__name__, hint.__name__)


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every key of the schema, sections flattened in order: (key, type, default, allowed
    values: the range, the choices, the length, or "any")."""
    rows: list[tuple[str, str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe_keys(hint, f"{key}.")
            continue
        allowed = []
        if "bounds" in f.metadata:
            allowed.append(f.metadata["bounds"].describe(prefix=prefix))
        if key in CHOICES:
            allowed.append("one of " + ", ".join(CHOICES[key]))
        if key in LENGTHS:
            allowed.append(f"{LENGTHS[key]} values")
        if key in NON_EMPTY:
            allowed.append("not empty")
        if key == "user":
            allowed.append("free-form, handed to the hooks")
        if key == "train.final_phase_user":
            allowed.append("user keys, over user: in the last train.freeze_bn_epochs")
        rows.append((key, _type_name(hint), getattr(defaults, f.name),
                     "; ".join(allowed) or "any"))
    return rows


if __name__ == "__main__":   # python -m pidnet.config: every key, its type, default and range
    for key, kind, default, allowed in describe_keys():
        print(f"{key:34s} {kind:22s} default {default!r:14s} {allowed}", flush=True)
