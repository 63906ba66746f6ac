"""Classifier members on developer data, alone and averaged: which ensemble to build.

    python scripts/member_probe.py runs/A/best.safetensors runs/B/best.safetensors ... \
        [--data .gpu/data] [--group w32=A,B --group w64=C]

For each 8-layer CNN checkpoint (lung-box input): UCSD val AUC of its logits, with and
without the slice's mirror averaged in, and its mean COVID-19 probability on the 14 MedSeg
val slices (real COVID-19 CT that no run trained on), each cut to its lung box as
training cuts them. Then the same for the mean logit of each group (default: one group
per width). fp32 on the CPU, the network called directly (no BatchNorm folding), so the
AUCs can differ from `ctmtl-train evaluate` (bf16, Predictor) in the third decimal.
The data root must hold `covid-ct/` and the lung-box pack `medseg-100-box/`
(`scripts/pack_data.py --out DIR --cut`).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mtl_model import load_checkpoint
from mtl_model.metrics import roc_auc
from training.config import DatasetSpec
from training.data import covid_ct_files, load_spec
from training.evaluate import ucsd_network_input


def logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Logits of (N, 1, S, S) inputs and of their mirrors, in batches of 64."""
    out = []
    with torch.inference_mode():
        for view in (x, x.flip(-1)):
            parts = [
                model(view[i : i + 64])["classification"].float() for i in range(0, len(x), 64)
            ]
            out.append(torch.cat(parts).numpy())
    return out[0], out[1]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=Path(".gpu/data"))
    ap.add_argument("--group", action="append", default=[], help="NAME=ckpt1,ckpt2,...")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    items = covid_ct_files(args.data / "covid-ct", "val")
    ucsd = torch.from_numpy(np.stack([ucsd_network_input(p, 256) for p, _ in items]))[:, None]
    y = np.array([int(label) for _, label in items])
    spec = DatasetSpec(kind="medseg_png", path="medseg-100-box", split="val")
    medseg = load_spec(spec, args.data, 256, cut=True).images.float().div(255.0)

    rows: dict[str, dict[str, np.ndarray]] = {}
    widths: dict[str, list[str]] = defaultdict(list)
    for path in args.checkpoints:
        model, meta = load_checkpoint(path, device="cpu")
        model.eval()
        u, uf = logits(model, ucsd)
        m, mf = logits(model, medseg)
        rows[str(path)] = {"ucsd": u, "ucsd_flip": uf, "medseg": m, "medseg_flip": mf}
        widths[f"w{meta.architecture.base_width}"].append(str(path))
    groups = dict(widths)
    for g in args.group:
        name, _, members = g.partition("=")
        groups[name] = members.split(",")

    def figures(u: np.ndarray, uf: np.ndarray, m: np.ndarray, mf: np.ndarray) -> dict[str, float]:
        return {
            "ucsd_val_auc": roc_auc(y, u),
            "ucsd_val_auc_flip": roc_auc(y, (u + uf) / 2),
            "medseg_val_mean_p": float(sigmoid(m).mean()),
            "medseg_val_mean_p_flip": float(sigmoid((m + mf) / 2).mean()),
        }

    result: dict[str, dict[str, float]] = {}
    for name, r in rows.items():
        result[name] = figures(r["ucsd"], r["ucsd_flip"], r["medseg"], r["medseg_flip"])
    for name, members in groups.items():
        mean = {k: np.mean([rows[p][k] for p in members], axis=0) for k in rows[members[0]]}
        result[f"mean of {name} ({len(members)})"] = figures(
            mean["ucsd"], mean["ucsd_flip"], mean["medseg"], mean["medseg_flip"]
        )
    print("| checkpoint | UCSD val AUC | with mirror | MedSeg val mean p | with mirror |")
    print("|---|---|---|---|---|")
    for name, f in result.items():
        print(
            f"| {name} | {f['ucsd_val_auc']:.4f} | {f['ucsd_val_auc_flip']:.4f} | "
            f"{f['medseg_val_mean_p']:.3f} | {f['medseg_val_mean_p_flip']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
