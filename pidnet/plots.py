"""Figures written beside the JSON they are drawn from (matplotlib, no screen needed)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110,
                                                        bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_sensitivity(rows: Sequence[Mapping[str, Any]], order: Sequence[str],
                     baseline: Mapping[str, float], metric: str, direction: str,
                     path: str | Path) -> Path:
    """Horizontal bars, one per layer, most sensitive on top (``order``); the float and fully
    quantized metrics as vertical lines. The figure grows with the number of layers."""
    plt = _pyplot()
    by_name = {r["layer"]: r for r in rows}
    values = [by_name[n]["metric"] for n in order]
    low = min(values + [baseline["float"], baseline["quantized"]])
    high = max(values + [baseline["float"], baseline["quantized"]])
    pad = 0.05 * (high - low) or 1.0
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.16 * len(order)))
    ax.barh(range(len(order)), [v - (low - pad) for v in values], left=low - pad,
            color="tab:blue", height=0.7)
    ax.axvline(baseline["float"], color="tab:green", linestyle="--",
               label=f"float {baseline['float']:.2f}")
    ax.axvline(baseline["quantized"], color="tab:red", linestyle="--",
               label=f"fully quantized {baseline['quantized']:.2f}")
    ax.set_yticks(range(len(order)), order, fontsize=6 if len(order) > 40 else 8)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlim(low - pad, high + pad)
    what = "only this layer float" if direction == "disable_one" else "only this layer quantized"
    ax.set_xlabel(f"{metric} with {what}")
    ax.set_title(f"Quantization sensitivity per layer ({len(order)} layers, most sensitive on top)",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _draw_curves(ax: Any, curves: Mapping[str, Sequence[float]], float_value: float,
                 ptq: Mapping[str, float], metric: str, title: str) -> None:
    for mode, values in curves.items():
        label = mode if mode == "control" else f"QAT {mode}"
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    ax.axhline(float_value, color="black", linestyle="--", label=f"float {float_value:.2f}")
    for i, (name, value) in enumerate(ptq.items()):
        ax.axhline(value, color=f"C{i + 4}", linestyle=":", label=f"{name} {value:.2f}")
    ax.set_xlabel("QAT epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)


def plot_qat_curves(curves: Mapping[str, Sequence[float]], float_value: float,
                    ptq: Mapping[str, float], metric: str, path: str | Path) -> Path:
    """Each QAT mode's metric per epoch, with the float model and the PTQ methods as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    _draw_curves(ax, curves, float_value, ptq, metric, "QAT per epoch against float and PTQ")
    return _save(fig, path)


def plot_float_curve(train_loss: Sequence[float], values: Sequence[float], metric: str,
                     path: str | Path) -> Path:
    """The float model's val metric per epoch (the kept epoch marked) and its training loss:
    whether the float baseline every figure rests on has stopped improving."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = range(1, len(values) + 1)
    ax.plot(epochs, values, marker="o", label=f"val {metric}")
    best = max(range(len(values)), key=lambda i: values[i]) if metric != "loss" else min(
        range(len(values)), key=lambda i: values[i])
    ax.plot([best + 1], [values[best]], marker="*", markersize=14, color="tab:red",
            linestyle="none", label=f"kept: epoch {best + 1}, {values[best]:.2f}")
    ax.set_xlabel("float epoch")
    ax.set_ylabel(metric)
    loss_ax = ax.twinx()
    loss_ax.plot(epochs, train_loss, color="tab:gray", alpha=0.6, label="train loss")
    loss_ax.set_ylabel("train loss")
    ax.set_title("Float training per epoch", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_qat_settings(settings: Mapping[str, Mapping[str, Any]], metric: str,
                      path: str | Path) -> Path:
    """One panel per bit setting: each run's mean per-epoch metric, float and the best PTQ."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, (name, s) in zip(axes[0], settings.items()):
        _draw_curves(ax, s["modes"], s["float"], {f"PTQ {s['ptq_method']}": s["ptq"]}, metric,
                     name.upper())
    return _save(fig, path)


def plot_layer_check(rows: Sequence[Mapping[str, Any]], max_share: float,
                     path: str | Path) -> Path:
    """Per quantized tensor of the exported graph, in execution order: the share of elements
    more than one quantization step off PyTorch (bars) and the largest difference in steps
    (points, right axis); the threshold as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.08 * len(rows) + 3), 4))
    x = range(len(rows))
    colors = ["tab:orange" if r["kind"] == "weight" else "tab:blue" for r in rows]
    ax.bar(x, [100 * r["off_by_more_than_one_step"] for r in rows], color=colors, width=0.8)
    ax.axhline(100 * max_share, color="tab:red", linestyle="--",
               label=f"threshold {max_share:.1%}")
    ax.set_ylabel("% of elements more than one step off")
    ax.set_xlabel("quantized tensor, execution order (blue: activation, orange: weight)")
    right = ax.twinx()
    right.plot(list(x), [r["max_steps_off"] for r in rows], "k.", markersize=3)
    right.set_ylabel("largest difference (steps)")
    ax.legend(loc="upper left")
    ax.set_title("INT8 graph against PyTorch fake-quant, tensor by tensor")
    return _save(fig, path)
