"""Predictor throughput, and (``--compare``) every engine and precision against torch fp32.

Usage:
  python benchmarks/predictor.py --width 64 --device cpu [--slices 300] [--batch 16]
         [--engine torch|openvino|auto] [--precision auto|bf16|fp32|int8] [--compile]
         [--checkpoint P]
  python benchmarks/predictor.py --compare [--checkpoint P] [--series DIR ...]
         [--max-slices N] [--speed-slices 32] [--rounds 2] [--json OUT]

Throughput (default): slices/s and peak memory (process RSS high-water mark on CPU,
allocator peak on CUDA) of the predictor end to end (window, resize, network, resize back)
for a synthetic 512x512 HU volume. Random weights unless ``--checkpoint`` (speed does not
depend on the values).

``--compare``: the shipped checkpoint (or ``--checkpoint``) on real CT series (default:
the two DICOM series of the shared data, RICORD COVID-19 and Lung-PET-CT-Dx; neither is in
the int8 calibration set, ``mtl_model.calibration``), each run as the node runs it (HU
volume, lung mask, ``predict_hu`` with the lung mask). Every engine/precision available
here (torch fp32 as the reference, torch bf16, and OpenVINO fp32 / bf16 / int8 where
``ctmtl[openvino]`` is installed) against torch fp32: lesion probability max and 99.9th
percentile absolute difference (all pixels of all series), Dice of the binary lesion masks
at the checkpoint's threshold (pooled over all slices, and per series), slice COVID
probability max difference, series COVID probability difference per series; and slices/s
of each, measured in this one run: over the whole series (``series_slices_per_s``) and,
less exposed to other load on a shared machine, as the best of ``--rounds`` round-robin
passes over ``--speed-slices`` slices (``slices_per_s``, ``speed_vs_torch_fp32``). Setup
(building or loading the OpenVINO engine) is reported apart. Prints one JSON object that
names the machine (CPU model, bf16/AMX/VNNI flags, threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_model import CheckpointMetadata, Predictor, build_model
from mtl_model.stacks import default_data_root

DEFAULT_SERIES = ("dicom/ricord-1a-covid-chest-ct", "dicom/lung-pet-ct-dx-a0002")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


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


def machine() -> dict[str, Any]:
    """The CPU (model name and the flags that decide bf16 / int8 speed), threads, versions."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    from mtl_model.openvino_engine import nncf_version, openvino_version

    return {
        "host": platform.node(),
        "cpu": model,
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "openvino": openvino_version(),
        "nncf": nncf_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# --------------------------------------------------------------------------- throughput


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"engine": args.engine, "cache_dir": args.cache_dir}
    if args.checkpoint:
        predictor = Predictor(
            args.checkpoint, args.device, args.precision, args.batch, args.compile, **kwargs
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
            **kwargs,
        )
    vol = synthetic_volume(args.slices, args.size)
    warm = time.perf_counter()
    predictor.predict_hu(vol[: args.batch])  # warm-up (and compilation, if asked)
    warm_s = time.perf_counter() - warm
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    predictor.predict_hu(vol)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {
        "machine": machine(),
        "device": str(predictor.device),
        "engine": predictor.engine,
        "precision": predictor.precision,
        "compile": args.compile,
        "width": predictor.metadata.architecture.base_width,
        "weights": args.checkpoint or "random",
        "batch": args.batch,
        "volume": [args.slices, args.size, args.size],
        "warmup_s": round(warm_s, 2),
        "seconds": round(elapsed, 2),
        "slices_per_s": round(args.slices / elapsed, 2),
        "peak_memory_mb": round(peak_memory_mb(predictor.device), 1),
    }


# --------------------------------------------------------------------------- compare


def load_real_series(folder: Path, max_slices: int | None) -> dict[str, Any]:
    """A DICOM series as the node loads it (HU volume, geometry) with its lung mask."""
    from dicom_node.volume import load_series
    from mtl_model.lung import lung_mask

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    vol = load_series(files)
    hu = vol.hu
    lung = lung_mask(hu, vol.spacing)  # on the whole series, as the node does
    if max_slices is not None and hu.shape[0] > max_slices:
        idx = np.linspace(0, hu.shape[0] - 1, max_slices).round().astype(int)
        hu, lung = hu[idx], lung[idx]
    return {"name": folder.name, "hu": hu, "lung": lung, "in_lung": lung.any(axis=(1, 2))}


def variants() -> list[tuple[str, str]]:
    """(engine, precision) pairs available here; torch fp32 first (the reference)."""
    from mtl_model import native_bf16
    from mtl_model.openvino_engine import nncf_version, openvino_available

    cpu = torch.device("cpu")
    out = [("torch", "fp32"), ("torch", "bf16")]
    if openvino_available():
        out.append(("openvino", "fp32"))
        if native_bf16(cpu):
            out.append(("openvino", "bf16"))
        if nncf_version() is not None:
            out.append(("openvino", "int8"))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def compare(args: argparse.Namespace) -> dict[str, Any]:
    root = default_data_root()
    folders = [Path(s) for s in args.series] if args.series else [root / s for s in DEFAULT_SERIES]
    series = [load_real_series(f, args.max_slices) for f in folders]
    n_total = sum(s["hu"].shape[0] for s in series)
    speed_block = series[0]
    k = min(args.speed_slices, speed_block["hu"].shape[0])
    start = (speed_block["hu"].shape[0] - k) // 2
    block_hu = speed_block["hu"][start : start + k]
    block_lung = speed_block["lung"][start : start + k]

    results: dict[str, dict[str, Any]] = {}
    predictors: dict[str, Predictor] = {}
    reference: list[Any] = []
    threshold = 0.5
    for engine, precision in variants():
        name = f"{engine}_{precision}"
        t0 = time.perf_counter()
        p = Predictor(
            args.checkpoint, "cpu", precision, args.batch, engine=engine, cache_dir=args.cache_dir
        )
        setup_s = time.perf_counter() - t0
        threshold = p.metadata.labels.threshold
        p.predict_hu(block_hu[: args.batch], lung_mask=block_lung[: args.batch])  # warm-up
        t0 = time.perf_counter()
        preds = [p.predict_hu(s["hu"], s["in_lung"], s["lung"]) for s in series]
        elapsed = time.perf_counter() - t0
        entry: dict[str, Any] = {
            "engine": p.engine,
            "precision": p.precision,
            "setup_s": round(setup_s, 1),
            "series_slices_per_s": round(n_total / elapsed, 3),
        }
        if p.engine_cache is not None:
            entry["engine_cache"] = str(p.engine_cache)
        if not reference:
            reference = preds
        else:
            entry |= differences(reference, preds, series, threshold)
        results[name] = entry
        predictors[name] = p
    # throughput, round robin over the engines so that load drifts hit them all alike
    times: dict[str, list[float]] = {n: [] for n in predictors}
    for _ in range(args.rounds):
        for name, p in predictors.items():
            t0 = time.perf_counter()
            p.predict_hu(block_hu, lung_mask=block_lung)
            times[name].append(time.perf_counter() - t0)
    ref_speed = k / min(times["torch_fp32"])
    for name, ts in times.items():
        speed = k / min(ts)
        results[name]["slices_per_s"] = round(speed, 3)
        results[name]["speed_vs_torch_fp32"] = round(speed / ref_speed, 2)
    return {
        "machine": machine(),
        "checkpoint": str(predictors["torch_fp32"].metadata.model_version),
        "device_uid": predictors["torch_fp32"].metadata.device_uid,
        "batch": args.batch,
        "threshold": threshold,
        "series": {s["name"]: int(s["hu"].shape[0]) for s in series},
        "speed_block": {"series": speed_block["name"], "slices": k, "rounds": args.rounds},
        "reference": "torch_fp32",
        "results": results,
    }


def differences(
    ref: list[Any], pred: list[Any], series: list[dict[str, Any]], threshold: float
) -> dict[str, Any]:
    """How far ``pred`` is from ``ref`` over all series (module docstring)."""
    diffs, inter, sizes = [], 0, 0
    per_series: dict[str, Any] = {}
    slice_max = 0.0
    for r, p, s in zip(ref, pred, series, strict=True):
        d = np.abs(p.lesion_probability - r.lesion_probability)
        diffs.append(d.ravel())
        mp, mr = p.lesion_probability >= threshold, r.lesion_probability >= threshold
        inter += int(np.logical_and(mp, mr).sum())
        sizes += int(mp.sum()) + int(mr.sum())
        slice_d = float(np.abs(p.slice_covid_probability - r.slice_covid_probability).max())
        slice_max = max(slice_max, slice_d)
        per_series[s["name"]] = {
            "mask_dice": round(dice(mp, mr), 5),
            "lesion_pixels_ref": int(mr.sum()),
            "series_covid_prob": round(float(p.series_covid_probability), 5),
            "series_covid_prob_ref": round(float(r.series_covid_probability), 5),
            "series_covid_prob_diff": float(
                abs(p.series_covid_probability - r.series_covid_probability)
            ),
            "slice_covid_prob_max_diff": slice_d,
        }
    all_d = np.concatenate(diffs)
    return {
        "lesion_prob_max_diff": float(all_d.max()),
        "lesion_prob_p99_9_diff": float(np.quantile(all_d, 0.999)),
        "lesion_mask_dice": round(2.0 * inter / sizes, 5) if sizes else 1.0,
        "slice_covid_prob_max_diff": slice_max,
        "series_covid_prob_max_diff": max(v["series_covid_prob_diff"] for v in per_series.values()),
        "per_series": per_series,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="source slice size (pixels)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--engine", default="torch", choices=["torch", "openvino", "auto"])
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "int8"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument(
        "--compare", action="store_true", help="every engine/precision vs torch fp32, real CT"
    )
    ap.add_argument("--series", nargs="*", default=None, help="DICOM series folders (--compare)")
    ap.add_argument("--max-slices", type=int, default=None, help="per series, evenly spaced")
    ap.add_argument("--speed-slices", type=int, default=32, help="slices per speed pass")
    ap.add_argument("--rounds", type=int, default=2, help="round-robin speed passes")
    ap.add_argument("--cache-dir", default=None, help="OpenVINO engine cache folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    report = compare(args) if args.compare else throughput(args)
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
