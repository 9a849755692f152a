"""Checkpoints as plain dicts: atomic writes, safe loads, and a reported weight loader.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint is data, and one whose
unpickling would run code is refused before that code runs.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch
from torch import nn

from .atomic import atomic_write
from .errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The official training wrapper (``FullModel``) keeps the network under ``model.``, beside
# its loss buffers; DistributedDataParallel keeps it under ``module.``.
_WRAPPER_PREFIX = "model."
_DDP_PREFIX = "module."


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` through a temporary file and a rename, so a crash never
    leaves a torn file. Adds the format version."""
    payload = {"format_version": FORMAT_VERSION, **state}
    return atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file as data only; any failure is a one-line ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check model_path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(f"{path} was refused: loading it would run code "
                                  f"({unsafe.group(1)}); a checkpoint must be plain tensor data"
                                  ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint; point model_path at a "
                              ".pt/.pth file saved with torch.save") from None
    except Exception as exc:  # zip errors, truncated files ...
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}); "
                              "point model_path at a .pt/.pth file") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


@dataclass
class LoadReport:
    """What ``load_weights`` did, key by key."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"loaded {len(self.loaded)}, missing {len(self.missing)}, "
                f"unexpected {len(self.unexpected)}, shape-mismatched {len(self.mismatched)}")
        if self.dropped:
            text += f", dropped {len(self.dropped)} training-wrapper buffers"
        return text


def extract_state_dict(obj: Mapping[str, Any], model_keys: set[str] | None = None
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Find the model weights in any supported layout; return them and the keys dropped.

    Layouts: a bare state dict; ``{'state_dict': ...}``; this toolkit's ``{'model': ...}``;
    keys prefixed ``model.`` (the official training wrapper, whose loss buffers are dropped) or
    ``module.`` (DistributedDataParallel). A prefix is kept when the model's own keys use it.
    """
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("no tensors found in the checkpoint; expected a state dict")
    dropped: list[str] = []
    own_prefixed = model_keys or set()
    for prefix in (_DDP_PREFIX, _WRAPPER_PREFIX):
        if any(k.startswith(prefix) for k in own_prefixed):
            continue
        if any(k.startswith(prefix) for k in tensors):
            dropped += [k for k in tensors if not k.startswith(prefix)]
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors, dropped


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Any],
                 strict: bool = True) -> LoadReport:
    """Load weights from a path or a dict into ``model`` and report what matched.

    With ``strict=True`` a missing or shape-mismatched key is an error naming the first few;
    with ``strict=False`` only tensors whose name and shape match are loaded (for partial,
    e.g. ImageNet-pretrained, weights). Unexpected keys are reported, never silently used.
    """
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    own = model.state_dict()
    state, dropped = extract_state_dict(obj, set(own))
    report = LoadReport(dropped=dropped)
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(key)
        else:
            to_load[key] = value
    report.missing = [k for k in own if k not in to_load and k not in report.mismatched]
    if strict and (report.missing or report.mismatched):
        bad = report.mismatched[:3] + report.missing[:3]
        raise CheckpointError(
            f"weights do not fit the model ({report.summary()}), e.g. {', '.join(bad)}; "
            "check the model variant and num_classes, or load with strict=False")
    model.load_state_dict(to_load, strict=False)
    report.loaded = list(to_load)
    logger.info("weights: %s", report.summary())
    for name, keys in (("unexpected", report.unexpected), ("shape-mismatched", report.mismatched),
                       ("missing", report.missing)):
        if keys:
            logger.warning("%d %s keys, e.g. %s", len(keys), name, ", ".join(keys[:3]))
    return report
