"""``qat_train.py``: float training (``--mode float``), the baseline the QAT modes start from."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from .checkpoint import read_checkpoint, save_checkpoint
from .cli import base_parser, run_cli
from .config import config_to_dict
from .engine import build_scheduler, pick_metric, rng_state, set_rng_state, train_one_epoch
from .errors import CheckpointError
from .pipeline import build_criterion, build_model, evaluate_model, start_session
from .reports import write_csv, write_json

logger = logging.getLogger(__name__)

MODES = ("float",)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Train a model: the float baseline (--mode float).")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir from its last checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="start over in an output_dir that already holds a run")
    return parser


def _train(args: argparse.Namespace) -> None:
    session = start_session(args, default_output=f"runs/{args.mode}", resume=args.resume,
                            force=args.force)
    cfg, out = session.cfg, session.out
    model = build_model(session)
    train_loader = session.hooks.get_data_loader(cfg, "train")
    val_loader = session.hooks.get_data_loader(cfg, "val")
    criterion = build_criterion(session)
    optimizer = session.hooks.get_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.train.schedule,
                                cfg.train.epochs * len(train_loader), cfg.train.poly_power)

    history: list[dict[str, Any]] = []
    best: float | None = None
    start_epoch = 0
    if args.resume:
        ckpt = read_checkpoint(out / "last.pt")
        if ckpt.get("mode") != args.mode:
            raise CheckpointError(f"{out / 'last.pt'} is from --mode {ckpt.get('mode')}, "
                                  f"not --mode {args.mode}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, best, history = ckpt["epoch"], ckpt["best_metric"], ckpt["history"]
        logger.info("resumed %s at epoch %d", out / "last.pt", start_epoch)

    metric_name, higher = None, True
    for epoch in range(start_epoch, cfg.train.epochs):
        stats = train_one_epoch(model, train_loader, criterion, optimizer, session.device,
                                epoch, scheduler, cfg.train.log_interval)
        metrics = evaluate_model(session, model, val_loader, criterion)
        metric_name, higher = pick_metric(metrics, cfg.metric)
        value = metrics[metric_name]
        improved = best is None or (value > best if higher else value < best)
        best = value if improved else best
        history.append({"epoch": epoch + 1, "train_loss": stats["loss"],
                        "train_seconds": round(stats["seconds"], 2), **metrics,
                        "lr": optimizer.param_groups[0]["lr"]})
        logger.info("epoch %d/%d  train loss %.4f  %s %.2f  best %.2f", epoch + 1,
                    cfg.train.epochs, stats["loss"], metric_name, value, best)
        state = {"mode": args.mode, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch + 1, "best_metric": best, "metric": metric_name,
                 "history": history, "rng": rng_state(), "config": config_to_dict(cfg)}
        if improved:
            save_checkpoint(state, out / "best.pt")
        save_checkpoint(state, out / "last.pt")
        write_csv(out / "epochs.csv", history)

    final = history[-1] if history else {}
    results = {"script": "qat_train", "mode": args.mode, "metric": metric_name or cfg.metric,
               "best": best, "final": final, "epochs": history,
               "checkpoints": {"best": str(out / "best.pt"), "last": str(out / "last.pt")}}
    print(write_json(out / "results.json", results))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_train, build_parser(), argv)
