"""Start-up steps every script shares: config, run folder, hooks, device, model, evaluation."""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import remove_temporaries
from .batches import Pairs, call_model
from .checkpoint import extract_state_dict, load_weights, read_checkpoint, save_checkpoint
from .config import CalibConfig, Config, config_to_dict, load_config, save_config
from .distributed import broadcast_from_main, init_from_env, is_main, rank
from .engine import mean_loss, resolve_device, rng_preserved, seed_everything, to_device
from .errors import CheckpointError, DataError, InputError, OutputError
from .finite import describe_nonfinite, finite_outputs, nonfinite_tensors
from .hooks import Hooks, load_hooks
from .reports import prepare_output_dir

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """What a script needs once its inputs are checked."""

    cfg: Config
    out: Path
    hooks: Hooks
    device: torch.device
    prebuilt: nn.Module | None = None   # the hooks' own model, built to check it at start-up

    def fresh_model(self) -> nn.Module:
        """The hooks' model as ``get_model`` returns it (the one built at start-up, once)."""
        model, self.prebuilt = self.prebuilt, None
        return model if model is not None else self.hooks.get_model(self.cfg)


def check_model_input(cfg: Config, hooks: Hooks) -> nn.Module | None:
    """Everything about the model a run starts from, checked before the run folder exists:
    ``model_path`` a readable checkpoint file with finite weights, or, without one, the hooks'
    own model with finite weights (returned, so it is built once)."""
    if cfg.model_path is None:
        seed_everything(cfg.seed + rank())   # as for a model built after start-up
        model = hooks.get_model(cfg)
        if isinstance(model, nn.Module):
            bad = nonfinite_tensors(model.state_dict().items())
            if bad:
                raise InputError(f"the model get_model in {cfg.hooks} returned holds NaN or Inf "
                                 f"in {describe_nonfinite(bad)}; fix the weights it loads")
        return model
    path = Path(cfg.model_path)
    if path.is_dir():
        raise CheckpointError(f"model_path {path} is a directory, not a checkpoint file; "
                              "point it at a .pt/.pth file")
    if not path.exists():
        raise CheckpointError(f"model_path {path} does not exist")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError:
        if hooks.model_loads_itself:   # get_model(model_path) may read a format of its own
            return None
        raise
    try:
        state, _ = extract_state_dict(ckpt)
    except CheckpointError:
        if hooks.model_loads_itself:
            return None
        raise CheckpointError(f"{path} holds no tensors; point model_path at a state dict or "
                              "a checkpoint of this toolkit") from None
    bad = nonfinite_tensors(state.items())
    if bad:
        raise CheckpointError(f"{path} holds NaN or Inf in {describe_nonfinite(bad)}; these "
                              "weights are broken: use an earlier checkpoint or retrain")
    return None


def _write_run_config(cfg: Config, out: Path, created: bool) -> None:
    """The resolved config into the new run folder; a folder that cannot take it is bad
    input (nothing has run yet), and a folder made for it is removed again."""
    try:
        save_config(cfg, out / "config.yaml")
    except OutputError as exc:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise InputError(f"{exc}; fix output_dir or set another one") from None


def start_session(args: argparse.Namespace, default_output: str, resume: bool = False,
                  force: bool = False, resumable: bool = True,
                  validate: Callable[[Config, Hooks], None] | None = None,
                  join_group: bool = True) -> Session:
    """Resolve the config, check the hooks, prepare the run folder and seed everything.

    Inputs are all checked (``validate`` adds the script's own checks) before the run folder
    is touched, so bad input changes nothing. Under torchrun the process joins the group
    unless ``join_group`` is false (a script that shares work out by itself joins later).
    """
    cfg = load_config(args.config, args.set)
    if cfg.output_dir is None:
        cfg.output_dir = default_output
    hooks = load_hooks(cfg.hooks)
    hooks.check_config(cfg)
    if validate is not None:
        validate(cfg, hooks)
    device = resolve_device(cfg.device)
    if cfg.data_path is not None and not Path(cfg.data_path).exists():
        raise DataError(f"data_path {cfg.data_path} does not exist; fix it, or set it to null "
                        "for the built-in synthetic scenes")
    prebuilt = check_model_input(cfg, hooks)
    created = not Path(cfg.output_dir).exists()
    out = prepare_output_dir(cfg.output_dir, resume=resume, force=force, resumable=resumable)
    device = init_from_env(device, join=join_group)
    if is_main():   # the one writer, before it writes: a killed run's unfinished writes go
        if left := remove_temporaries(out):
            logger.info("removed %d unfinished writes of a stopped run: %s", len(left),
                        ", ".join(left))
        for item in args.set:
            logger.info("override: %s", item)
        _write_run_config(cfg, out, created)
        logger.info("resolved config: %s", out / "config.yaml")
        logger.debug("config: %s", config_to_dict(cfg))
    if prebuilt is None:   # else seeded before it was built: its init drew the first numbers
        seed_everything(cfg.seed + rank())
    return Session(cfg, out, hooks, device, prebuilt)


class FixedBatches:
    """The same batches for every measurement: the first ``num_batches`` of ``loader`` drawn
    once (with the torch seed set, so a shuffling loader gives a fixed, seeded subset) and kept
    on the device; with ``num_batches`` null, the loader itself. ``dataset`` is passed
    through for hooks that read it."""

    def __init__(self, loader: Iterable, num_batches: int | None, device: torch.device,
                 seed: int) -> None:
        self.dataset = getattr(loader, "dataset", None)
        if num_batches is None:
            self._source: Iterable = loader
        else:
            torch.manual_seed(seed)
            self._source = [to_device(b, device) for b in itertools.islice(loader, num_batches)]
            if not self._source:
                raise DataError("the val loader yielded no batches; check get_data_loader")

    @classmethod
    def val(cls, session: Session, num_batches: int | None) -> FixedBatches:
        """The first ``num_batches`` of the hooks' val split, seeded by the config."""
        return cls(session.hooks.get_data_loader(session.cfg, "val"), num_batches,
                   session.device, session.cfg.seed)

    def __iter__(self) -> Iterator:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)  # type: ignore[arg-type]


def build_model(session: Session) -> nn.Module:
    """The hooks' model, with ``model_path`` loaded through the reported loader, on the
    session's device."""
    cfg = session.cfg
    model = session.fresh_model()
    if cfg.model_path is not None and not session.hooks.model_loads_itself:
        load_weights(model, cfg.model_path, strict=cfg.strict_load)
    elif cfg.model_path is not None:   # the hooks loaded it themselves: check what they loaded
        bad = nonfinite_tensors(model.state_dict().items())
        if bad:
            raise CheckpointError(f"get_model in {cfg.hooks} loaded {cfg.model_path} with NaN or "
                                  f"Inf in {describe_nonfinite(bad)}; these weights are broken")
    model = model.to(session.device)
    check_prediction(session, model)
    return model


def build_criterion(session: Session) -> Callable[[Any, Any], torch.Tensor]:
    criterion = session.hooks.get_criterion(session.cfg)
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(session.device)
    return criterion


def evaluate_model(session: Session, model: nn.Module, loader: Iterable,
                   criterion: Callable[[Any, Any], torch.Tensor]) -> dict[str, float]:
    """The hooks' ``evaluate`` when defined, else the mean criterion loss; never trains. An
    output with NaN or Inf stops it, naming the layer where they start."""
    model.eval()
    with torch.no_grad(), finite_outputs(model, "evaluating"):
        if session.hooks.has_evaluate:
            return session.hooks.evaluate(model, loader, session.cfg)
        return mean_loss(model, pairs(session, loader), criterion, session.device)


def pairs(session: Session, loader: Iterable) -> Pairs:
    """``loader``'s batches as ``(inputs, targets)`` (dict batches by ``batch.inputs`` and
    ``batch.targets``), for the toolkit's own loops; the hooks' ``evaluate`` gets the loader
    as it is."""
    return Pairs(loader, session.cfg.batch.inputs, session.cfg.batch.targets)


def example_input(session: Session, loader: Iterable) -> Any:
    """The inputs of the first batch of ``loader``, on the session's device (for one forward
    pass that reads the model's structure)."""
    for inputs, _targets in pairs(session, loader):
        return to_device(inputs, session.device)
    raise DataError("the data loader yielded no batches; check get_data_loader")


def check_prediction(session: Session, model: nn.Module) -> None:
    """One forward pass of the first val batch: the prediction is found among the model's
    outputs now (``hooks.prediction``), so an ambiguous output stops the first script that
    meets it, with one line, not the export at the end of the pipeline. The random state is
    left as it was, so the run is the one it would be without the check."""
    with rng_preserved():
        inputs = example_input(session, session.hooks.get_data_loader(session.cfg, "val"))
    was_training = model.training
    try:
        with torch.no_grad():
            outputs = call_model(model.eval(), inputs)
    finally:
        model.train(was_training)
    session.hooks.prediction(outputs, session.cfg)


def quantized_copy_with_stats(session: Session, float_model: nn.Module, loader: Iterable,
                              equalize: bool | None = None
                              ) -> tuple[nn.Module, dict[str, Any], float]:
    """A fake-quant copy of ``float_model`` and its activation statistics, collected once over
    ``calib.num_batches`` of ``loader`` (merged across ranks); also the seconds taken. Ranges
    are not set yet: ``quant.apply_ranges`` does that for any method. With ``equalize``
    (default ``calib.equalize``) the copy's batch norms are folded and its layers equalized
    before the quantizers go in."""
    from . import quant   # imports modelopt: only scripts that quantize pay for it

    cfg = session.cfg
    start = time.perf_counter()
    example = example_input(session, loader)
    model = copy.deepcopy(float_model)
    if cfg.calib.equalize if equalize is None else equalize:
        quant.equalize(model.to(session.device).eval(), example)
    model = quant.insert_quantizers(model, cfg.quant, cfg.export.target, example)
    model = model.to(session.device)
    stats = activation_stats(session, model, loader)
    return model, stats, time.perf_counter() - start


@dataclass(frozen=True)
class Steps:
    """The post-training steps beyond ranges a calibration applies (``calib.equalize``,
    ``calib.bias_correction``, ``calib.weight_rounding``)."""

    equalize: bool = False
    bias_correction: bool = False
    adaround: bool = False

    @classmethod
    def configured(cls, calib: CalibConfig) -> Steps:
        return cls(calib.equalize, calib.bias_correction, calib.weight_rounding == "adaround")

    @classmethod
    def named(cls, names: Iterable[str]) -> Steps:
        names = set(names)
        return cls("equalize" in names, "bias_correction" in names, "adaround" in names)

    @property
    def name(self) -> str:
        parts = [n for n, on in (("equalize", self.equalize),
                                 ("bias correction", self.bias_correction),
                                 ("AdaRound", self.adaround)) if on]
        return " + ".join(parts)

    def config(self) -> dict[str, Any]:
        """The config keys that apply these steps."""
        return {"calib.equalize": self.equalize, "calib.bias_correction": self.bias_correction,
                "calib.weight_rounding": "adaround" if self.adaround else "nearest"}


def calib_inputs(session: Session, loader: Iterable) -> list[Any]:
    """The inputs of the first ``calib.step_batches`` batches of ``loader``, on the device:
    what AdaRound and bias correction learn from."""
    return [to_device(inputs, session.device) for inputs, _targets
            in itertools.islice(pairs(session, loader), session.cfg.calib.step_batches)]


def finish_post_training(session: Session, model: nn.Module, loader: Iterable,
                         steps: Steps) -> dict[str, Any]:
    """The steps that follow range calibration, in place: AdaRound, then bias correction
    (which corrects what rounding leaves). Under torchrun every rank ends with rank 0's
    weights. Returns what each step reports, with its seconds."""
    from . import quant

    cfg = session.cfg
    report: dict[str, Any] = {}
    if not (steps.adaround or steps.bias_correction):
        return report
    inputs = calib_inputs(session, loader)
    example = inputs[0]
    if steps.adaround:
        start = time.perf_counter()
        settings = quant.AdaRoundSettings(
            iterations=cfg.calib.adaround_iterations, reg=cfg.calib.adaround_reg,
            beta=tuple(cfg.calib.adaround_beta), warm_start=cfg.calib.adaround_warm_start)
        report["adaround"] = {"layers": quant.adaround(model, inputs, example, settings,
                                                       seed=cfg.seed),
                              "seconds": time.perf_counter() - start}
    if steps.bias_correction:
        start = time.perf_counter()
        report["bias_correction"] = {"layers": quant.correct_bias(model, inputs, example),
                                     "seconds": time.perf_counter() - start}
    # each rank ran the steps on its own shard of the calib batches: rank 0's result for all
    broadcast_from_main([t for t in model.state_dict().values() if t.is_floating_point()])
    return report


def post_training(session: Session, float_model: nn.Module, loader: Iterable,
                  calibration: Calibration, steps: Steps | None = None
                  ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``float_model`` quantized, calibrated with ``calibration`` and finished with ``steps``
    (default: the config's): the PTQ model every script starts from. Also its activation
    statistics, and what each step reports with the seconds it took."""
    steps = Steps.configured(session.cfg.calib) if steps is None else steps
    model, stats, seconds = quantized_copy_with_stats(session, float_model, loader,
                                                      steps.equalize)
    calibration.apply(model, stats)
    report = finish_post_training(session, model, loader, steps)
    report["statistics_seconds"] = seconds
    return model, stats, report


@dataclass(frozen=True)
class Calibration:
    """One way to set activation ranges from statistics: a ``calib.method`` (and, for
    ``percentile``, its ``calib.percentile``)."""

    method: str
    percentile: float

    @property
    def name(self) -> str:
        return f"percentile {self.percentile:g}" if self.method == "percentile" else self.method

    def config(self) -> dict[str, Any]:
        """The config keys that make this the calibration of ``calib.method``."""
        keys: dict[str, Any] = {"calib.method": self.method}
        if self.method == "percentile":
            keys["calib.percentile"] = self.percentile
        return keys

    def apply(self, model: nn.Module, stats: dict[str, Any]) -> list[str]:
        """Set ``model``'s activation ranges from ``stats``; returns the uncalibrated ones."""
        from . import quant
        return quant.apply_ranges(model, stats, self.method, self.percentile)


def qat_start(calibration: dict[str, Any]) -> dict[str, Any]:
    """The config keys that start QAT from a PTQ calibration (``Calibration.config()``):
    ``calib`` mode calibrates with it, ``stats`` starts from its ranges."""
    return {**calibration, "qat.stats_range": calibration["calib.method"]}


def calibrations(calib: CalibConfig) -> list[Calibration]:
    """What PTQ compares: every method of ``calib.methods``, ``percentile`` once per value of
    ``calib.percentiles``."""
    return [Calibration(method, p) for method in calib.methods
            for p in (calib.percentiles if method == "percentile" else [calib.percentile])]


def activation_stats(session: Session, model: nn.Module, loader: Iterable) -> dict[str, Any]:
    """Float statistics of every activation quantizer's input over ``calib.num_batches`` of
    ``loader``, merged across ranks: what ``quant.apply_ranges`` turns into ranges."""
    from . import quant

    cfg = session.cfg
    return quant.merge_stats(quant.collect_stats(model, pairs(session, loader), session.device,
                                                 cfg.calib.num_batches, cfg.quant.num_bins))


def save_quantized(path: Path, model: nn.Module, cfg: Config, **info: Any) -> Path:
    """A quantized model as a plain checkpoint: weights and ranges plus modelopt's state and
    the deployment target its quantizers were placed for (``export.target``)."""
    from . import quant

    return save_checkpoint({"kind": "quantized", "model": model.state_dict(),
                            "modelopt_state": quant.quant_state(model),
                            "graph": quant.graph_form(model),
                            "folded": quant.folded_layers(model),
                            "target": cfg.export.target,
                            "config": config_to_dict(cfg), **info}, path)


def checkpoint_target(ckpt: dict[str, Any]) -> str:
    """The deployment target a quantized checkpoint was placed for."""
    return ckpt.get("target") or ckpt.get("config", {}).get("export", {}).get("target",
                                                                                "tensorrt")


def check_quantized(ckpt: dict[str, Any], path: str | Path, target: str) -> dict[str, Any]:
    """``ckpt`` itself when it is a quantized checkpoint placed for ``target``; otherwise a
    ``CheckpointError`` that says how to make the right one."""
    if ckpt.get("kind") != "quantized" or "modelopt_state" not in ckpt:
        raise CheckpointError(f"{path} holds float weights, not a quantized checkpoint; make one "
                              "with calibrate.py, qat_train.py or sensitivity_analysis.py")
    placed = checkpoint_target(ckpt)
    if placed != target:
        raise CheckpointError(f"{path} was quantized for export.target={placed}, not {target}; "
                              f"set export.target={placed}, or calibrate or train again with "
                              f"--set export.target={target}")
    return ckpt


def restore_checkpoint(session: Session, ckpt: dict[str, Any]) -> nn.Module:
    """The hooks' model with the quantizers, weights and ranges of a checked quantized
    checkpoint (``check_quantized``), on the session's device."""
    from . import quant

    cfg = session.cfg
    if session.hooks.model_loads_itself:   # get_model(model_path) builds from the float weights
        cfg = dataclasses.replace(cfg, model_path=ckpt.get("config", {}).get("model_path"))
    model = session.hooks.get_model(cfg)
    model = quant.restore_quantized(model, ckpt["modelopt_state"], ckpt["model"],
                                    ckpt.get("graph"), ckpt.get("folded", ())
                                    ).to(session.device)
    check_prediction(session, model)
    return model


def load_quantized(session: Session, path: str | Path) -> nn.Module:
    """The hooks' model with the quantizers, weights and ranges of a quantized checkpoint.

    A checkpoint placed for another deployment target than ``export.target`` is a
    ``CheckpointError``: its quantizers sit where that target wants them."""
    ckpt = check_quantized(read_checkpoint(path), path, session.cfg.export.target)
    return restore_checkpoint(session, ckpt)


def quantized_model(session: Session) -> tuple[nn.Module, str]:
    """The quantized model a script works on, and where it came from.

    ``model_path`` a quantized checkpoint: loaded with its ranges. Otherwise the float model
    (``model_path`` float weights, or the hooks' own model) is quantized here and calibrated
    with ``calib.method`` on ``calib.num_batches`` of the calib split. A hooks file that loads
    ``model_path`` itself may use a format of its own: a file this toolkit cannot read is then
    the hooks' float weights.
    """

    cfg = session.cfg
    ckpt = None
    if cfg.model_path is not None:
        try:
            ckpt = read_checkpoint(cfg.model_path)
        except CheckpointError:
            if not session.hooks.model_loads_itself:
                raise
    if ckpt is not None and ckpt.get("kind") == "quantized":
        ckpt = check_quantized(ckpt, cfg.model_path, cfg.export.target)
        return restore_checkpoint(session, ckpt), f"quantized checkpoint {cfg.model_path}"
    steps = Steps.configured(cfg.calib)
    model, _, _ = post_training(session, build_model(session),
                                session.hooks.get_data_loader(cfg, "calib"),
                                Calibration(cfg.calib.method, cfg.calib.percentile), steps)
    origin = (f"float weights {cfg.model_path}" if cfg.model_path is not None
              else f"the model returned by {cfg.hooks}")
    how = cfg.calib.method + (f" and {steps.name}" if steps.name else "")
    return model, f"{origin}, calibrated here with {how}"


def require_trained_model(hooks: Hooks, cfg: Config, purpose: str) -> None:
    """Refuse, before any work, to quantize a model the hooks declare untrained.

    A hooks file returns a trained model by default (the original README's contract); one
    whose ``get_model`` builds an untrained network says so with ``RETURNS_TRAINED_MODEL =
    False`` and then needs ``model_path``."""
    if cfg.model_path is None and not hooks.returns_trained_model:
        raise InputError(f"{purpose} needs trained weights, and get_model in {cfg.hooks} "
                         "returns an untrained network: set model_path (e.g. "
                         "runs/float/best.pt from qat_train.py --mode float)")
