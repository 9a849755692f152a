"""Entropy and mse amax for every activation quantizer of PIDNet-S: this project's vectorised
routines against modelopt's own entropy routine, on the same histograms, in the same run.

    python -m bench.calib_speed [--weights runs/float/best.pt] [--size 256 512]

Statistics are collected once (synthetic scenes); then, quantizer by quantizer, the two entropy
routines run alternately and are timed. Prints a summary and saves bench/results/calib_speed.json.
Goal (issue 4): at least 20x faster, same amax within 1%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

# modelopt's private routines are the baseline being measured, not a dependency of the project
from modelopt.torch.quantization.calib.histogram import _compute_amax_entropy, _compute_amax_mse

from pidnet import quant
from pidnet.calib import amax_entropy, amax_mse
from pidnet.checkpoint import load_weights
from pidnet.config import QuantConfig
from pidnet.data import SegmentationTransform, SyntheticScenes
from pidnet.model import create_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="float PIDNet-S checkpoint (8 classes)")
    parser.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="time only the first N quantizers")
    parser.add_argument("--out", default=str(ROOT / "bench/results/calib_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = create_model("pidnet_s", num_classes=8, augment=False).eval()
    if args.weights:
        load_weights(model, args.weights, strict=False)
    model = quant.insert_quantizers(model, QuantConfig())
    data = SyntheticScenes(args.images, tuple(args.size), seed=0, transform=SegmentationTransform())
    batches = [(torch.stack([data[i][0] for i in range(j, min(j + 2, len(data)))]), None)
               for j in range(0, len(data), 2)]
    start = time.perf_counter()
    stats = quant.collect_stats(model, batches, torch.device("cpu"))
    collect_s = time.perf_counter() - start

    rows = []
    names = [n for n, s in stats.items() if s is not None][: args.limit]
    for name in names:
        s = stats[name]
        counts_np, edges_np = s.counts.numpy().astype(np.int64), s.edges.numpy()
        t0 = time.perf_counter()
        ours = amax_entropy(s.counts, s.edges)
        t1 = time.perf_counter()
        theirs = float(_compute_amax_entropy(counts_np.copy(), edges_np, 8, False))
        t2 = time.perf_counter()
        ours_mse = amax_mse(s.counts, s.edges)
        t3 = time.perf_counter()
        theirs_mse = float(_compute_amax_mse(counts_np.copy(), edges_np, 8, False))
        rows.append({"quantizer": name, "bins": len(s.counts), "entropy_ours": ours,
                     "entropy_modelopt": theirs, "entropy_ours_s": t1 - t0,
                     "entropy_modelopt_s": t2 - t1, "mse_ours": ours_mse,
                     "mse_modelopt": theirs_mse, "mse_ours_s": t3 - t2,
                     "rel_diff": abs(ours - theirs) / theirs if theirs else 0.0,
                     "bin_width": float(s.edges[1])})
        print(f"{name:45s} entropy ours {ours:9.4f} ({t1 - t0:6.3f}s)  modelopt {theirs:9.4f} "
              f"({t2 - t1:6.2f}s)", flush=True)

    ours_total = sum(r["entropy_ours_s"] for r in rows)
    theirs_total = sum(r["entropy_modelopt_s"] for r in rows)
    summary = {
        "quantizers": len(rows), "image_size": args.size, "images": args.images,
        "weights": args.weights, "collect_seconds": collect_s,
        "entropy_seconds_ours": ours_total, "entropy_seconds_modelopt": theirs_total,
        "speedup_total": theirs_total / ours_total,
        "speedup_median": statistics.median(r["entropy_modelopt_s"] / r["entropy_ours_s"]
                                            for r in rows),
        "max_rel_amax_diff": max(r["rel_diff"] for r in rows),
        "within_1pct": sum(r["rel_diff"] <= 0.01 for r in rows),
        "mse_seconds_ours": sum(r["mse_ours_s"] for r in rows),
        "mse_modelopt_returns_smallest_candidate": sum(
            abs(r["mse_modelopt"] - 128.5 * r["bin_width"]) < 1e-3 * r["bin_width"] + 1e-9
            for r in rows),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(args.out)


if __name__ == "__main__":
    main()
