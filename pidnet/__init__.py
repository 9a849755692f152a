"""PIDNetQAT: quantize a segmentation network to INT8 and keep its accuracy."""
from __future__ import annotations

__version__ = "0.1.0"
