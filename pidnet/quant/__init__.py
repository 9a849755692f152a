"""The adapter to NVIDIA's fake-quant modules (nvidia-modelopt): the only package importing it.

modelopt's API moves between releases; everything the toolkit needs from it is here:
inserting quantizers, turning them on and off by layer, setting ranges, saving and restoring.

Placement follows the deployment target. For TensorRT: conv (and pooling) inputs per tensor,
weights per output channel, and the skip input of each residual add, so TensorRT can fuse the
conv that feeds the add. For onnxruntime, every tensor is quantized once, where it is made
(convolutions, adds, products, sigmoids, ReLUs, concatenations, pooling, resizes), since its
integer kernels need a quantized input, weight and output.
"""
from __future__ import annotations

import logging
import warnings

# Importing modelopt on a machine without CUDA makes torch warn that no CUDA runtime exists and
# that torch.jit.script is deprecated: nothing a user can act on, so it stays off the console.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".torch.jit.script. is deprecated")

from .modules import (  # noqa: E402
    WEIGHT,
    QuantAdd,
    QuantBlend,
    QuantReLU,
    activation_quantizers,
    execution_order,
    folded_layers,
    graph_form,
    grid_bounds,
    has_range,
    insert_quantizers,
    layer_quantizers,
    layers_enabled,
    match_layers,
    quant_state,
    quantizers,
    restore_quantized,
    set_weight_ranges,
)
from .export import disable_all, export_onnx, fold_batch_norms  # noqa: E402
from .ptq import AdaRoundSettings, adaround, correct_bias, equalize  # noqa: E402
from .qat import (  # noqa: E402
    LearnedRangeQuantizer,
    RangeTracker,
    lsq_grad_scale,
    make_ranges_learnable,
    make_ranges_static,
    mirror_learned_ranges,
    start_learned_ranges,
    track_weight_ranges,
)
from .stats import (  # noqa: E402
    ActivationStats,
    apply_ranges,
    collect_stats,
    exact_histogram,
    merge_stats,
)

__all__ = [
    "WEIGHT", "ActivationStats", "AdaRoundSettings", "adaround", "correct_bias", "equalize",
    "folded_layers", "LearnedRangeQuantizer", "QuantAdd", "QuantBlend", "QuantReLU",
    "RangeTracker", "activation_quantizers", "apply_ranges", "collect_stats", "disable_all",
    "exact_histogram", "execution_order", "export_onnx", "graph_form", "grid_bounds",
    "fold_batch_norms", "has_range",
    "insert_quantizers", "layer_quantizers", "layers_enabled", "lsq_grad_scale",
    "make_ranges_learnable", "make_ranges_static", "mirror_learned_ranges",
    "start_learned_ranges", "match_layers", "merge_stats", "quant_state", "quantizers",
    "restore_quantized", "set_weight_ranges", "track_weight_ranges",
]
