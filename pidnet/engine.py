"""The training and evaluation loops, for any model the hooks provide."""
from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .batches import batch_size, call_model, total_loss
from .batches import main_prediction  # noqa: F401  (hooks files written earlier import it here)
from .distributed import is_main
from .errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (DataLoader workers derive their seeds from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoaders: numpy and python follow the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """All random states as plain data, for checkpoints (loadable with ``weights_only``)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]],
            "python": _to_plain(random.getstate())}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Every random state as it was before the body: a check that draws a batch (a shuffled
    loader draws its seed) leaves the run it checks unchanged."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _to_plain(obj: Any) -> Any:
    return [_to_plain(o) for o in obj] if isinstance(obj, tuple) else obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors in any nesting of dicts, lists and tuples to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def interactive() -> bool:
    """Whether progress bars are shown: the main process on a terminal."""
    return sys.stderr.isatty() and is_main()


def progress_bar(iterable: Iterable, desc: str, leave: bool = False) -> Iterable:
    """A tqdm bar (with its ETA) when ``interactive()``, the bare iterable otherwise."""
    return tqdm(iterable, desc=desc, leave=leave, disable=not interactive(), dynamic_ncols=True)


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: Callable[[Any, Any], Any],
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    log_interval: int = 20, freeze_bn: bool = False,
                    after_backward: Callable[[], None] | None = None,
                    after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over ``loader`` (``(inputs, targets)`` pairs: ``batches.Pairs``); the scheduler
    steps per iteration. Raises ``TrainingError`` on a non-finite loss so the caller keeps the
    last good checkpoint. ``freeze_bn`` keeps batch norm layers on their running statistics
    (as QAT does for its last epochs). A criterion returning a dict of losses is summed; each
    part is logged. ``after_backward`` runs before each optimizer step, ``after_step`` after
    it."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    total, count, images = 0.0, 0, 0
    start = time.perf_counter()
    for step, (inputs, targets) in enumerate(progress_bar(loader, f"epoch {epoch}")):
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        loss, parts = total_loss(criterion(call_model(model, inputs), targets))
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at epoch {epoch} step {step}; lower the "
                                "learning rate or check the data (last good checkpoint kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        if scheduler is not None:
            scheduler.step()
        value = loss.item()
        total, count = total + value, count + 1
        images += batch_size(inputs)
        if log_interval and (step + 1) % log_interval == 0:
            elapsed = time.perf_counter() - start
            named = "".join(f"  {k} {v.item():.4f}" for k, v in parts.items())
            logger.info("epoch %d step %d  loss %.4f (%.4f)%s  %.1f img/s  lr %.2e", epoch,
                        step + 1, value, total / count, named, images / elapsed,
                        optimizer.param_groups[0]["lr"])
    if count == 0:
        raise TrainingError("the train loader yielded no batches; check get_data_loader")
    return {"loss": total / count, "seconds": time.perf_counter() - start}


class _Forward(nn.Module):
    """``model`` called as the hooks' batches call it (a tensor, tuple or dict of inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> Any:
        return call_model(self.model, inputs)


def recompute_batch_norm(model: nn.Module, loader: Iterable, device: torch.device) -> int:
    """Set every batch norm's running statistics to the average over one pass of ``loader``
    (``(inputs, targets)`` pairs) of the batch means and variances it normalizes with in
    training: torch's ``swa_utils.update_bn`` (no gradients, the weights untouched), for inputs
    of any form. Under torchrun each rank passes over its shard and the ranks' averages are
    averaged. Returns how many batch norms; the model's mode is kept."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    batches = ([to_device(inputs, device)] for inputs, _ in progress_bar(loader, "batch norm"))
    training = model.training
    torch.optim.swa_utils.update_bn(batches, _Forward(model))
    model.train(training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for m in norms:
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer)
                buffer /= dist.get_world_size()
    return len(norms)


@torch.no_grad()
def mean_loss(model: nn.Module, loader: Iterable, criterion: Callable[[Any, Any], Any],
              device: torch.device) -> dict[str, float]:
    """The default ``evaluate``: the criterion (its total, for a dict of losses) averaged over
    the loader's ``(inputs, targets)`` pairs."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for inputs, targets in progress_bar(loader, "eval"):
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        total += total_loss(criterion(call_model(model, inputs), targets))[0].double().cpu()
        count += 1
    stats = torch.tensor([total.item(), float(count)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return {"loss": (stats[0] / max(stats[1], 1.0)).item()}


def pick_metric(metrics: Mapping[str, float], name: str | None) -> tuple[str, bool]:
    """The metric that ranks checkpoints and whether higher is better."""
    if name is None:
        name = "miou" if "miou" in metrics else next(iter(metrics))
    if name not in metrics:
        raise ConfigError(f"metric '{name}' is not among evaluate()'s results: "
                          f"{', '.join(metrics)}")
    return name, name != "loss"


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                    power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration learning-rate schedule: poly (upstream PIDNet), cosine (QAT) or constant."""
    total = max(total_steps, 1)
    if schedule == "poly":
        factor: Callable[[int], float] = lambda s: (1 - min(s, total - 1) / total) ** power
    elif schedule == "cosine":
        factor = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    else:
        factor = lambda s: 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
