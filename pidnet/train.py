"""``qat_train.py``: float training and the three quantization-aware training approaches.

``--mode float``   trains the float model (the baseline the QAT modes start from).
``--mode calib``   collects statistics, calibrates (``calib.method``), freezes the ranges, trains.
``--mode stats``   collects statistics; the observed ranges (the raw max, or the histogram's
                   ``qat.stats_range``) start the run and follow the data by moving average,
                   frozen for the last ``qat.freeze_ranges_epochs``.
``--mode direct``  no calibration pass: ranges are learned by gradient (LSQ), starting from
                   LSQ's initialisation on the first calib batch (``qat.direct_init: lsq``)
                   or at ``qat.direct_init_amax`` with no data at all (``fixed``; sigmoid
                   gates and their complements start at their known range, 1); ``auto``:
                   ``lsq`` at 8-bit activations, ``fixed`` below.

All modes share one loop, evaluate every epoch, keep ``best.pt`` and ``last.pt`` and resume.
QAT modes read ``qat.*`` in place of ``train.*`` (the hooks see them as ``train.lr`` etc.), and
end with static ranges that export can use.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import read_checkpoint, save_checkpoint
from .cli import base_parser, run_cli
from .config import Config, config_to_dict
from .distributed import barrier, broadcast_from_main, is_main, shutdown, world_size
from .engine import (build_scheduler, pick_metric, recompute_batch_norm, rng_state,
                     set_rng_state, train_one_epoch)
from .errors import CheckpointError, ConfigError
from .hooks import Hooks
from .pipeline import (Session, activation_stats, build_criterion, build_model, evaluate_model,
                       Calibration, example_input, pairs, post_training, require_trained_model,
                       start_session)
from .reports import write_csv, write_json

logger = logging.getLogger(__name__)

MODES = ("float", "calib", "stats", "direct")


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Train a model: the float baseline or one of three QAT approaches.",
                         force_help="start over in an output_dir that already holds a run",
                         prog="qat_train.py")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir from its last checkpoint (or "
                        "start it, if it was stopped before writing one)")
    return parser


def qat_view(cfg: Config) -> Config:
    """The config as the training loop and hooks see it in a QAT mode: ``qat.*`` as ``train.*``."""
    train = dataclasses.replace(cfg.train, epochs=cfg.qat.epochs, lr=cfg.qat.lr,
                                schedule=cfg.qat.schedule, log_interval=cfg.qat.log_interval,
                                freeze_bn_epochs=cfg.qat.freeze_bn_epochs, ema_decay=0.0,
                                precise_bn=False, final_phase_user={})
    return dataclasses.replace(cfg, train=train)


def final_phase_view(cfg: Config) -> Config:
    """The config as the hooks see it in the frozen batch-norm phase: ``user:`` with
    ``train.final_phase_user`` over it."""
    return dataclasses.replace(cfg, user={**cfg.user, **cfg.train.final_phase_user})


@dataclass
class QatState:
    """What a QAT mode adds to the float loop."""

    baselines: dict[str, Any] = field(default_factory=dict)
    tracker: Any = None                         # stats: quant.RangeTracker
    weight_tracking: Any = None                 # qat.track_weight_ranges: the hook's handle
    range_ratios: dict[str, float] = field(default_factory=dict)   # stats: amax / batch max
    range_params: list[nn.Parameter] = field(default_factory=list)   # learned step sizes


def _prepare_qat(session: Session, model: nn.Module, mode: str, criterion: Callable,
                 val_loader: Any, resume_ckpt: dict[str, Any] | None
                 ) -> tuple[nn.Module, QatState]:
    """Insert quantizers and set the starting ranges of ``mode`` (or restore them on resume)."""
    from . import quant

    cfg = session.cfg
    state = QatState()
    metric_of = lambda m: evaluate_model(session, m, val_loader, criterion)
    lsq_batch = None
    if resume_ckpt is not None:
        model = quant.restore_quantized(model, resume_ckpt["modelopt_state"],
                                        resume_ckpt["model"], resume_ckpt.get("graph"),
                                        resume_ckpt.get("folded", ()))
        model = model.to(session.device)
        state.baselines = resume_ckpt["baselines"]
        state.range_ratios = resume_ckpt.get("range_ratios", {})
    else:
        state.baselines["float"] = metric_of(model)
        calib_loader = session.hooks.get_data_loader(cfg, "calib")
        # the PTQ baseline is measured on a copy, so direct mode's model never sees its data;
        # calib and stats start from it (the config's post-training steps included)
        ptq, stats, _ = post_training(session, model, calib_loader,
                                      Calibration(cfg.calib.method, cfg.calib.percentile))
        state.baselines["ptq"] = {"method": cfg.calib.method, **metric_of(ptq)}
        if mode in ("calib", "stats"):
            model = ptq
        else:   # one forward pass reads the structure
            example = example_input(session, calib_loader)
            model = quant.insert_quantizers(model, cfg.quant, cfg.export.target, example)
        if mode == "stats":
            quant.apply_ranges(model, stats, cfg.qat.stats_range, cfg.calib.percentile)
            if cfg.qat.stats_range == "max":   # the raw max tracks the raw batch max
                state.range_ratios = {n: 1.0 for n in quant.activation_quantizers(model)}
        elif mode == "direct" and direct_start(cfg) == "lsq":
            lsq_batch = example   # LSQ starts from the first calib batch
    model = model.to(session.device)
    if mode == "direct" or cfg.qat.learn_weight_ranges:
        state.range_params = quant.make_ranges_learnable(
            model, "lsq" if lsq_batch is not None else "fixed", cfg.qat.direct_init_amax,
            activations=mode == "direct", weights=cfg.qat.learn_weight_ranges)
    if lsq_batch is not None:
        quant.start_learned_ranges(model, lsq_batch)
        broadcast_from_main(state.range_params)   # started from each rank's own batch
    if resume_ckpt is None:   # the untrained quantized model this mode starts from
        state.baselines["start"] = (state.baselines["ptq"] if mode == "calib"
                                    else metric_of(model))
    if mode == "stats":
        state.tracker = quant.RangeTracker(model, cfg.qat.range_momentum, state.range_ratios)
    if cfg.qat.track_weight_ranges and not cfg.qat.learn_weight_ranges:
        state.weight_tracking = quant.track_weight_ranges(model, cfg.quant.weight_range)
    return model, state


def _auto_applies(cfg: Config) -> bool:
    """Where an ``auto`` QAT setting turns its option on: at 8-bit activations, where float
    statistics and LSQ's first-batch start describe what the quantizers see (val chose both
    for PIDNet-S that way: config.yaml)."""
    return cfg.quant.act_bits >= 8


def direct_start(cfg: Config) -> str:
    """How ``direct`` mode's ranges start (``qat.direct_init``; auto: LSQ's start from the first
    batch at 8-bit activations, the fixed data-free start below)."""
    if cfg.qat.direct_init != "auto":
        return cfg.qat.direct_init
    return "lsq" if _auto_applies(cfg) else "fixed"


def recalibrates(cfg: Config) -> bool:
    """Whether ``stats`` mode recalibrates its ranges as they freeze (``qat.stats_recalibrate``;
    auto: at 8-bit activations; at W4A4 it hurt, the float statistics of a 4-bit network being
    far from what its quantizers see)."""
    return cfg.qat.stats_recalibrate == "always" or (cfg.qat.stats_recalibrate == "auto"
                                                 and _auto_applies(cfg))


def _recalibrate(session: Session, model: nn.Module) -> None:
    """``stats`` with ``qat.stats_recalibrate``: the tracked ranges replaced, as they freeze,
    by ``qat.stats_range`` on statistics of the trained network (merged over ranks). Runs at
    the first frozen epoch only, so a resumed run keeps the ranges its checkpoint holds."""
    from . import quant

    cfg = session.cfg
    stats = activation_stats(session, model, session.hooks.get_data_loader(cfg, "calib"))
    quant.apply_ranges(model, stats, cfg.qat.stats_range, cfg.calib.percentile)
    logger.info("stats: ranges recalibrated (%s) on the trained network as they freeze",
                cfg.qat.stats_range)


def _sync_range_grads(params: list[nn.Parameter]) -> Callable[[], None] | None:
    """Average the learned ranges' gradients over ranks (they are not DDP parameters). Only
    ranges still learning take part: a frozen one keeps no gradient on any rank, so the
    optimizer leaves it where it is (a zero gradient would move it by momentum), as one
    process does."""
    if world_size() == 1 or not params:
        return None

    def sync() -> None:
        learning = [p for p in params if p.requires_grad]
        if not learning:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in learning])
        dist.all_reduce(flat)
        flat /= world_size()
        for p, g in zip(learning, flat.split([p.numel() for p in learning])):
            p.grad = g.reshape(p.shape)
    return sync


def _weight_average(model: nn.Module, decay: float, ckpt: dict[str, Any] | None
                    ) -> AveragedModel | None:
    """The exponential moving average of ``model``'s weights and buffers (``train.ema_decay``,
    as timm's ModelEmaV3), restored from a resumed run's checkpoint; ``None`` when off."""
    if decay == 0:
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    if ckpt is not None:
        if "ema_steps" not in ckpt:
            raise CheckpointError("the run being resumed kept no weight average; resume it "
                                  "with train.ema_decay=0 or start a new run")
        ema.module.load_state_dict(ckpt["model"])
        ema.n_averaged.fill_(ckpt["ema_steps"])
    return ema


def _train(args: argparse.Namespace) -> None:
    def needs_weights(cfg: Config, hooks: Hooks) -> None:
        started = (Path(cfg.output_dir) / "last.pt").exists()
        if args.mode != "float" and not (args.resume and started):
            require_trained_model(hooks, cfg, f"--mode {args.mode}")
        if args.mode == "float" and cfg.train.precise_bn and not cfg.train.freeze_bn_epochs:
            raise ConfigError("config key 'train.precise_bn' sets the batch-norm statistics "
                              "when they freeze, and 'train.freeze_bn_epochs' is 0: set it to "
                              "the last epochs to train with them frozen, or precise_bn=false")
        if args.mode == "float" and cfg.train.final_phase_user:
            if not cfg.train.freeze_bn_epochs:
                raise ConfigError("config key 'train.final_phase_user' sets what the hooks see "
                                  "in the frozen batch-norm phase, and 'train.freeze_bn_epochs' "
                                  "is 0: set it to the last epochs to train that way, or "
                                  "final_phase_user={}")
            if not hooks.reads_config:
                raise ConfigError(f"config key 'train.final_phase_user' needs get_data_loader"
                                  f"(cfg, split) in {cfg.hooks}; its get_data_loader(data_path) "
                                  "cannot read user keys: set train.final_phase_user={}")
            try:
                hooks.check_config(final_phase_view(cfg))
            except ConfigError as exc:
                raise ConfigError(f"{exc} (from train.final_phase_user)") from None
        if args.mode in ("stats", "direct") and cfg.qat.freeze_ranges_epochs >= cfg.qat.epochs:
            what = "track" if args.mode == "stats" else "learn"
            frozen = cfg.qat.freeze_ranges_epochs
            raise ConfigError(f"config key 'qat.freeze_ranges_epochs' ({frozen}) freezes the "
                              f"ranges for all qat.epochs ({cfg.qat.epochs}): --mode "
                              f"{args.mode} would never {what} them; lower "
                              "qat.freeze_ranges_epochs or raise qat.epochs")

    session = start_session(args, default_output=f"runs/{args.mode}", resume=args.resume,
                            force=args.force, validate=needs_weights)
    args.progress.resume_flag = True
    if (session.out / "last.pt").exists():
        args.progress.saved = f"{session.out / 'last.pt'} holds the run so far"
    try:
        _run(session, args)
    finally:
        shutdown()


def _run(session: Session, args: argparse.Namespace) -> None:
    cfg, out, mode = session.cfg, session.out, args.mode
    qat = mode != "float"
    run_cfg = qat_view(cfg) if qat else cfg
    ckpt = None
    if args.resume and (out / "last.pt").exists():
        ckpt = read_checkpoint(out / "last.pt")
    elif args.resume:   # killed before its first checkpoint: nothing to lose, start over
        logger.info("no checkpoint in %s yet: starting from the beginning", out)
    if ckpt is not None and ckpt.get("mode") != mode:
        raise CheckpointError(f"{out / 'last.pt'} is from --mode {ckpt.get('mode')}, "
                              f"not --mode {mode}")

    if ckpt is None:
        model = build_model(session)
    else:   # the weights (and quantizers) come from the checkpoint
        model = session.fresh_model().to(session.device)
    criterion = build_criterion(session)
    train_loader = session.hooks.get_data_loader(run_cfg, "train")
    final_loader = train_loader   # the frozen phase's (train.final_phase_user)
    if run_cfg.train.final_phase_user:
        final_loader = session.hooks.get_data_loader(final_phase_view(run_cfg), "train")
    val_loader = session.hooks.get_data_loader(run_cfg, "val")
    state = QatState()
    if qat:
        model, state = _prepare_qat(session, model, mode, criterion, val_loader, ckpt)
    elif ckpt is not None:   # the live weights; "model" holds the average when there is one
        model.load_state_dict(ckpt.get("live", ckpt["model"]))
    ema = _weight_average(model, run_cfg.train.ema_decay, ckpt)

    optimizer = session.hooks.get_optimizer(model, run_cfg)
    if state.range_params:
        optimizer.add_param_group({"params": state.range_params, "weight_decay": 0.0,
                                   "lr": cfg.qat.lr * cfg.qat.range_lr_scale})
    epochs, frozen = run_cfg.train.epochs, run_cfg.train.freeze_bn_epochs
    steps = (epochs - frozen) * len(train_loader) + frozen * len(final_loader)
    scheduler = build_scheduler(optimizer, run_cfg.train.schedule, steps,
                                run_cfg.train.poly_power)
    history: list[dict[str, Any]] = []
    best: float | None = None
    start_epoch = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, best, history = ckpt["epoch"], ckpt["best_metric"], ckpt["history"]
        logger.info("resumed %s at epoch %d", out / "last.pt", start_epoch)

    net = model
    if world_size() > 1:
        net = DistributedDataParallel(model, device_ids=None if session.device.type == "cpu"
                                      else [session.device.index])
    after_backward = _sync_range_grads(state.range_params)
    metric_name = None
    for epoch in range(start_epoch, epochs):
        final_phase = lambda n, e=epoch: n > 0 and e >= epochs - n   # one of the last n epochs
        if qat and final_phase(cfg.qat.freeze_ranges_epochs):
            if state.tracker is not None:
                state.tracker.freeze()
                if recalibrates(cfg) and epoch == epochs - cfg.qat.freeze_ranges_epochs:
                    _recalibrate(session, model)
            for p in state.range_params:
                p.requires_grad_(False)
        loader = final_loader if final_phase(frozen) else train_loader
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):   # DistributedSampler: a new shuffle every epoch
            sampler.set_epoch(epoch)
        if final_loader is not train_loader and epoch == epochs - frozen:
            logger.info("epochs %d-%d train on user keys %s", epoch + 1, epochs,
                        run_cfg.train.final_phase_user)
        # only after live epochs of this run: a run frozen throughout keeps the statistics its
        # model came with, which a frozen phase before may have trained against
        if run_cfg.train.precise_bn and 0 < epoch == epochs - frozen:
            n = recompute_batch_norm(model, pairs(session, loader), session.device)
            logger.info("batch norm frozen from epoch %d: %d statistics set from one pass "
                        "over the train split", epoch + 1, n)
        stats = train_one_epoch(net, pairs(session, loader), criterion, optimizer,
                                session.device, epoch,
                                scheduler, run_cfg.train.log_interval,
                                freeze_bn=final_phase(frozen),
                                after_backward=after_backward,
                                after_step=None if ema is None else lambda: ema.update_parameters(
                                    model))
        kept = model if ema is None else ema.module   # what is evaluated and saved
        metrics = evaluate_model(session, kept, val_loader, criterion)
        metric_name, higher = pick_metric(metrics, cfg.metric)
        value = metrics[metric_name]
        improved = best is None or (value > best if higher else value < best)
        best = value if improved else best
        history.append({"epoch": epoch + 1, "train_loss": stats["loss"],
                        "train_seconds": round(stats["seconds"], 2), **metrics,
                        "lr": optimizer.param_groups[0]["lr"]})
        logger.info("epoch %d/%d  train loss %.4f  %s %.2f  best %.2f", epoch + 1, epochs,
                    stats["loss"], metric_name, value, best)
        if is_main():
            _save(out, kept, mode, optimizer, scheduler, epoch + 1, best, metric_name, history,
                  state, cfg, improved, live=None if ema is None else (model, ema))
        args.progress.saved = f"{out / 'last.pt'} holds epoch {epoch + 1} of {epochs}"
        barrier()

    if state.tracker is not None:
        state.tracker.remove()
    if state.weight_tracking is not None:
        state.weight_tracking.remove()
    if state.range_params:
        from . import quant
        quant.make_ranges_static(model)
    if is_main():
        results = {"script": "qat_train", "mode": mode, "metric": metric_name or cfg.metric,
                   "baselines": state.baselines, "best": best,
                   "final": history[-1] if history else {}, "epochs": history,
                   "checkpoints": {"best": str(out / "best.pt"), "last": str(out / "last.pt")}}
        print(write_json(out / "results.json", results))


def _save(out, model: nn.Module, mode: str, optimizer, scheduler, epoch: int, best: float,
          metric: str, history: list, state: QatState, cfg: Config, improved: bool,
          live: tuple[nn.Module, AveragedModel] | None = None) -> None:
    """``last.pt`` (and ``best.pt`` when improved), written atomically. QAT checkpoints carry
    modelopt's state and static ranges, so every script can load them. With a weight average
    ``model`` is the average; ``live`` (the trained model and its average) adds what a resumed
    run needs to continue to the same weights: the live weights and the average's step count."""
    ckpt: dict[str, Any] = {
        "mode": mode, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "epoch": epoch, "best_metric": best,
        "metric": metric, "history": history, "rng": rng_state(), "config": config_to_dict(cfg)}
    if live is not None:
        ckpt.update(live=live[0].state_dict(), ema_steps=int(live[1].n_averaged))
    if mode != "float":
        from . import quant
        quant.mirror_learned_ranges(model)
        ckpt.update(kind="quantized", modelopt_state=quant.quant_state(model),
                    graph=quant.graph_form(model), folded=quant.folded_layers(model),
                    baselines=state.baselines, range_ratios=state.range_ratios)
    if improved:
        save_checkpoint(ckpt, out / "best.pt")
    save_checkpoint(ckpt, out / "last.pt")
    write_csv(out / "epochs.csv", history)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_train, build_parser(), argv)
