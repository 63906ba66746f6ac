"""Predictor throughput for a whole series, end to end (window + resize + infer + resize back).

Usage: python benchmarks/predictor.py --width 64 --device cpu [--slices 300] [--batch 16]
       [--precision auto|bf16|fp32] [--compile] [--compare] [--checkpoint P]

Prints slices/s and peak memory (process RSS high-water mark on CPU, allocator peak on CUDA)
for a synthetic 512x512 HU volume. Random weights by default (speed does not depend on the
values); ``--checkpoint`` times a real one. ``--compare`` also runs fp32 on the same input
and prints the largest bf16-vs-fp32 differences.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np
import torch

from mtl_model import CheckpointMetadata, Predictor, build_model


def synthetic_volume(slices: int, size: int, seed: int = 0) -> np.ndarray:
    """A chest-like HU volume: air outside, soft-tissue body, two dark lungs with texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
    lungs = (((xx - 0.32) / 0.13) ** 2 + ((yy - 0.5) / 0.2) ** 2 < 1) | (
        ((xx - 0.68) / 0.13) ** 2 + ((yy - 0.5) / 0.2) ** 2 < 1
    )
    base = np.where(body, 40.0, -1000.0)
    base = np.where(lungs, -850.0, base)
    vol = np.empty((slices, size, size), dtype=np.int16)
    for z in range(slices):
        vol[z] = (base + rng.normal(0, 30, (size, size))).astype(np.int16)
    return vol


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="source slice size (pixels)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compare", action="store_true", help="also run fp32 and report differences")
    ap.add_argument("--checkpoint", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.checkpoint:
        predictor = Predictor(
            args.checkpoint, args.device, args.precision, args.batch, args.compile
        )
    else:
        model = build_model(
            "mtl", args.width, args.input_size, tasks=["segmentation", "classification"]
        )
        meta = CheckpointMetadata.model_validate(
            {
                "architecture": {
                    "base_width": args.width,
                    "input_size": args.input_size,
                    "tasks": ["segmentation", "classification"],
                },
                "preprocessing": {"input_size": args.input_size},
            }
        )
        predictor = Predictor.from_model(
            model,
            meta,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch,
            compile=args.compile,
        )
    vol = synthetic_volume(args.slices, args.size)
    warm = time.perf_counter()
    predictor.predict_hu(vol[: args.batch])  # warm-up (and compilation, if asked)
    warm_s = time.perf_counter() - warm
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pred = predictor.predict_hu(vol)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    report: dict[str, object] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": str(predictor.device),
        "device_name": torch.cuda.get_device_name()
        if predictor.device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "precision": predictor.precision,
        "compile": args.compile,
        "width": predictor.metadata.architecture.base_width,
        "batch": args.batch,
        "volume": [args.slices, args.size, args.size],
        "warmup_s": round(warm_s, 2),
        "seconds": round(elapsed, 2),
        "slices_per_s": round(args.slices / elapsed, 2),
        "peak_memory_mb": round(peak_memory_mb(predictor.device), 1),
    }
    if args.compare and predictor.precision == "bf16":
        fp32 = (
            Predictor(args.checkpoint, args.device, "fp32", args.batch)
            if args.checkpoint
            else Predictor.from_model(
                model, meta, device=args.device, precision="fp32", batch_size=args.batch
            )
        )
        n = min(args.slices, 32)
        a, b = predictor.predict_hu(vol[:n]), fp32.predict_hu(vol[:n])
        assert a.lesion_probability is not None and b.lesion_probability is not None
        assert a.slice_covid_probability is not None and b.slice_covid_probability is not None
        report["bf16_vs_fp32"] = {
            "slices": n,
            "lesion_prob_max_abs_diff": float(
                np.abs(a.lesion_probability - b.lesion_probability).max()
            ),
            "lesion_prob_mean_abs_diff": float(
                np.abs(a.lesion_probability - b.lesion_probability).mean()
            ),
            "lesion_mask_disagreement": float(
                ((a.lesion_probability >= 0.5) != (b.lesion_probability >= 0.5)).mean()
            ),
            "slice_covid_prob_max_abs_diff": float(
                np.abs(a.slice_covid_probability - b.slice_covid_probability).max()
            ),
        }
    del pred
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
