"""Start-up steps every script shares: config, run folder, hooks, device, model, evaluation."""
from __future__ import annotations

import argparse
import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_weights, read_checkpoint, save_checkpoint
from .config import Config, config_to_dict, load_config, save_config
from .distributed import init_from_env, is_main, rank
from .engine import mean_loss, resolve_device, seed_everything
from .errors import CheckpointError, DataError
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


def start_session(args: argparse.Namespace, default_output: str, resume: bool = False,
                  force: bool = False, resumable: bool = True,
                  validate: Callable[[Config], None] | None = None) -> Session:
    """Resolve the config, check the hooks, prepare the run folder and seed everything.

    Inputs are all checked (``validate`` adds the script's own checks) before the run folder
    is touched, so bad input changes nothing.
    """
    cfg = load_config(args.config, args.set)
    if cfg.output_dir is None:
        cfg.output_dir = default_output
    if validate is not None:
        validate(cfg)
    hooks = load_hooks(cfg.hooks)
    device = resolve_device(cfg.device)
    if cfg.data_path is not None and not Path(cfg.data_path).exists():
        raise DataError(f"data_path {cfg.data_path} does not exist; fix it, or set it to null "
                        "for the built-in synthetic scenes")
    if cfg.model_path is not None and not Path(cfg.model_path).is_file():
        raise CheckpointError(f"model_path {cfg.model_path} does not exist")
    out = prepare_output_dir(cfg.output_dir, resume=resume, force=force, resumable=resumable)
    device = init_from_env(device)
    if is_main():
        for item in args.set:
            logger.info("override: %s", item)
        logger.info("config: %s", config_to_dict(cfg))
        save_config(cfg, out / "config.yaml")
    seed_everything(cfg.seed + rank())
    return Session(cfg, out, hooks, device)


def build_model(session: Session) -> nn.Module:
    """The hooks' model, with ``model_path`` loaded through the reported loader, on the
    session's device."""
    cfg = session.cfg
    model = session.hooks.get_model(cfg)
    if cfg.model_path is not None and not session.hooks.model_loads_itself:
        load_weights(model, cfg.model_path, strict=cfg.strict_load)
    return model.to(session.device)


def build_criterion(session: Session) -> Callable[[Any, Any], torch.Tensor]:
    criterion = session.hooks.get_criterion(session.cfg)
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(session.device)
    return criterion


def evaluate_model(session: Session, model: nn.Module, loader: Iterable,
                   criterion: Callable[[Any, Any], torch.Tensor]) -> dict[str, float]:
    """The hooks' ``evaluate`` when defined, else the mean criterion loss; never trains."""
    model.eval()
    with torch.no_grad():
        if session.hooks.has_evaluate:
            return session.hooks.evaluate(model, loader, session.cfg)
        return mean_loss(model, loader, criterion, session.device)


def quantized_copy_with_stats(session: Session, float_model: nn.Module, loader: Iterable
                              ) -> tuple[nn.Module, dict[str, Any], float]:
    """A fake-quant copy of ``float_model`` and its activation statistics, collected once over
    ``calib.num_batches`` of ``loader`` (merged across ranks); also the seconds taken. Ranges
    are not set yet: ``quant.apply_ranges`` does that for any method."""
    from . import quant   # imports modelopt: only scripts that quantize pay for it

    cfg = session.cfg
    model = quant.insert_quantizers(copy.deepcopy(float_model), cfg.quant, cfg.export.target)
    model = model.to(session.device)
    start = time.perf_counter()
    stats = quant.merge_stats(quant.collect_stats(model, loader, session.device,
                                                  cfg.calib.num_batches, cfg.quant.num_bins))
    return model, stats, time.perf_counter() - start


def save_quantized(path: Path, model: nn.Module, cfg: Config, **info: Any) -> Path:
    """A quantized model as a plain checkpoint: weights and ranges plus modelopt's state."""
    from . import quant

    return save_checkpoint({"kind": "quantized", "model": model.state_dict(),
                            "modelopt_state": quant.quant_state(model),
                            "config": config_to_dict(cfg), **info}, path)


def load_quantized(session: Session, path: str | Path) -> nn.Module:
    """The hooks' model with the quantizers, weights and ranges of a quantized checkpoint."""
    from . import quant

    ckpt = read_checkpoint(path)
    if ckpt.get("kind") != "quantized" or "modelopt_state" not in ckpt:
        raise CheckpointError(f"{path} is not a quantized checkpoint (no modelopt state); "
                              "make one with calibrate.py or qat_train.py")
    model = session.hooks.get_model(session.cfg)
    model = quant.restore_quantized(model, ckpt["modelopt_state"], ckpt["model"])
    return model.to(session.device)
