"""Per-layer quantization sensitivity and the smallest set of layers kept in float.

The algorithm works on one quantized model and a ``measure`` function (the metric on a fixed
set of batches, eval mode, no gradients); quantizers are only switched on and off, never
re-inserted or re-calibrated:

1. baselines: the metric with every layer in float and with every layer quantized;
2. per layer, in execution order: the metric with only that layer in float (``disable_one``)
   or only that layer quantized (``enable_one``);
3. selection: the most sensitive layers go back to float one at a time, the real metric
   measured after each step, until it is within ``tolerance`` of float.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import quant

logger = logging.getLogger(__name__)

DIRECTIONS = ("disable_one", "enable_one")


@dataclass(frozen=True)
class Objective:
    """How metric values compare: which way is better and how far from float is allowed."""

    higher_is_better: bool
    tolerance: float

    def gap(self, value: float, reference: float) -> float:
        """How much worse ``value`` is than ``reference`` (negative when better)."""
        return reference - value if self.higher_is_better else value - reference

    def meets(self, value: float, float_value: float) -> bool:
        return self.gap(value, float_value) <= self.tolerance


def measure_layer(model: nn.Module, layers: Sequence[str], name: str, direction: str,
                  measure: Callable[[], float]) -> float:
    """The metric with only ``name`` in float (``disable_one``) or only ``name`` quantized
    (``enable_one``); the model's quantizer state is restored afterwards."""
    if direction == "disable_one":
        with quant.layers_enabled(model, [name], False):
            return measure()
    with quant.layers_enabled(model, layers, False), quant.layers_enabled(model, [name], True):
        return measure()


def sweep_layers(model: nn.Module, layers: Sequence[str], direction: str,
                 measure: Callable[[], float], quantized: float | None = None,
                 progress: Callable[[Sequence[str]], Iterator[str]] = iter
                 ) -> Iterator[dict[str, Any]]:
    """One row per layer of ``layers`` (in the given order), yielded as each finishes:
    its metric and, when ``quantized`` is given, its ``delta`` from the fully quantized
    metric."""
    all_layers = list(quant.layer_quantizers(model))
    for name in progress(layers):
        start = time.perf_counter()
        value = measure_layer(model, all_layers, name, direction, measure)
        yield {"layer": name, "metric": value,
               "delta": None if quantized is None else value - quantized,
               "seconds": round(time.perf_counter() - start, 3)}


def rank_layers(rows: Sequence[dict[str, Any]], direction: str, baseline: dict[str, float],
                objective: Objective) -> list[str]:
    """Layers from most to least sensitive. ``disable_one``: how much keeping the layer float
    recovers; ``enable_one``: how much quantizing it alone costs."""
    def sensitivity(row: dict[str, Any]) -> float:
        if direction == "disable_one":
            return objective.gap(baseline["quantized"], row["metric"])
        return objective.gap(row["metric"], baseline["float"])
    return [r["layer"] for r in sorted(rows, key=sensitivity, reverse=True)]


def select_float_layers(model: nn.Module, ranked: Sequence[str], baseline: dict[str, float],
                        objective: Objective, measure: Callable[[], float],
                        max_float_layers: int | None = None
                        ) -> tuple[list[str], list[dict[str, Any]], bool]:
    """Greedily return layers to float in ``ranked`` order until the measured metric is within
    the tolerance of float. Returns the float layers, the steps and whether the tolerance was
    met; the model is left with the selected layers' quantizers off. A selection that keeps
    every layer float is not a quantized model and does not count as meeting the tolerance."""
    limit = len(ranked) - 1 if max_float_layers is None else min(max_float_layers,
                                                                 len(ranked) - 1)
    chosen: list[str] = []
    value = baseline["quantized"]
    steps = [{"step": 0, "layer": None, "metric": value,
              "gap_to_float": objective.gap(value, baseline["float"])}]
    while not objective.meets(value, baseline["float"]) and len(chosen) < limit:
        name = ranked[len(chosen)]
        for q in quant.layer_quantizers(model)[name].values():
            q.disable()
        chosen.append(name)
        value = measure()
        steps.append({"step": len(chosen), "layer": name, "metric": value,
                      "gap_to_float": objective.gap(value, baseline["float"])})
        logger.info("selection step %d: %s float -> %.4f (float %.4f)", len(chosen), name,
                    value, baseline["float"])
    return chosen, steps, objective.meets(value, baseline["float"])


def exclude_override(layers: Sequence[str]) -> str:
    """The ``--set`` argument that keeps ``layers`` in float in calibrate.py and qat_train.py
    (JSON quoting, so every name stays a string in YAML)."""
    import json

    return f"--set 'quant.exclude={json.dumps(list(layers))}'"
