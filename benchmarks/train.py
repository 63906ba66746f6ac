"""Training throughput (slices/s) of the multi-task network: one full training step as in
``training.trainer`` (augmentation, forward of all heads, masked loss, backward, Adam).

    python benchmarks/train.py                       # CPU: widths 8 and 16, bf16 + fp32
    python benchmarks/train.py --device cuda --widths 64 --batch 32 --precision bf16

Prints one line per configuration, then one JSON object with every figure and the machine
(CPU model and flags, threads, GPU), which ``--json`` also writes. Numbers on a shared CPU
depend on what else runs; the line says how many threads were used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mtl_model import build_model
from training.augment import augment_batch
from training.config import AugmentConfig, LossConfig
from training.losses import MultiTaskLoss


def bench(
    width: int, size: int, batch: int, precision: str, device: torch.device, steps: int, warmup: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model("mtl", width, size).to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = MultiTaskLoss(LossConfig())
    g = torch.Generator().manual_seed(0)
    data = {
        "image": torch.rand(batch, 1, size, size, device=device),
        "mask": (torch.rand(batch, 1, size, size, device=device) > 0.9).float(),
        "has_mask": torch.arange(batch, device=device) % 4 == 0,
        "label": (torch.arange(batch, device=device) % 2).float(),
        "has_label": torch.ones(batch, dtype=torch.bool, device=device),
    }
    aug = AugmentConfig()
    use_amp = precision != "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    times: list[float] = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x, m = augment_batch(data["image"], data["mask"], aug, g)
        b = {**data, "image": x, "mask": m}
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            out = model(x.contiguous(memory_format=torch.channels_last))
        loss, _ = loss_fn(out, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "device": str(device),
        "width": width,
        "input_size": size,
        "batch": batch,
        "precision": precision,
        "steps": steps,
        "step_s_median": round(med, 4),
        "steps_per_s": round(1.0 / med, 3),
        "slices_per_s": round(batch / med, 2),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "all"])
    p.add_argument("--widths", type=int, nargs="+", default=None)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0 = default)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    devices: list[torch.device] = []
    if a.device in ("cpu", "all") or (a.device == "auto"):
        devices.append(torch.device("cpu"))
    if a.device in ("cuda", "all") or (a.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            print("no CUDA device", file=sys.stderr)
            return 2
        devices.append(torch.device("cuda"))
    results = []
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}"
    )
    for dev in devices:
        cuda = dev.type == "cuda"
        widths = a.widths or ([64] if cuda else [8, 16])
        precisions = a.precision or (["bf16"] if cuda else ["bf16", "fp32"])
        batch = a.batch or (32 if cuda else 8)
        steps = a.steps or (30 if cuda else 3)
        for w in widths:
            for prec in precisions:
                r = bench(w, a.size, batch, prec, dev, steps, a.warmup)
                results.append(r)
                print(
                    f"{r['device']:5s} width {w:3d} {a.size}px batch {batch:3d} {prec:5s}: "
                    f"{r['slices_per_s']:8.2f} slices/s ({r['steps_per_s']:.2f} steps/s, "
                    f"{r['threads']} threads)",
                    flush=True,
                )
    from predictor import machine  # benchmarks/, this script's folder

    figures = {"machine": machine(), "results": results}
    print(json.dumps(figures))
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
