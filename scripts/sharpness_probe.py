"""How much a checkpoint's series verdict depends on image sharpness.

Blurs every slice of each series of a labels CSV (Gaussian, sigma in pixels of the source
grid, in HU) and runs the node's own path on it (``dicom_node.pipeline.analyse_volume``):
a verdict that follows sharpness follows the scanner's kernel and slice thickness, not
the disease. 0.3.0 gave a held-out normal LUNA16 patient 0.22 sharp and 0.92 at sigma 3.

    python scripts/sharpness_probe.py --series config/eval/shared_series.csv --sigma 0 1.5 3
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from dicom_node.evaluate import load_series_input, read_labels
from dicom_node.pipeline import analyse_volume
from mtl_model import Predictor
from training.augment import gaussian_blur


def blurred(hu: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return hu
    x = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[:, None]
    out = [
        gaussian_blur(x[i : i + 16], torch.full((len(x[i : i + 16]),), sigma))
        for i in range(0, len(x), 16)
    ]
    return torch.cat(out)[:, 0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=Path, required=True, help="labels CSV (path,covid)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the release")
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.0, 1.5, 3.0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    predictor = Predictor(args.checkpoint, device=args.device)
    rows = []
    for item in read_labels(args.series):
        series = load_series_input(item.path)
        for sigma in args.sigma:
            a = analyse_volume(blurred(series.hu, sigma), series.spacing, predictor)
            row = {
                "series": item.label,
                "covid": item.covid,
                "sigma_px": sigma,
                "covid_probability": round(a.numbers().covid_probability, 4),
                "lung_involvement_percent": round(a.numbers().lung_involvement_percent, 2),
            }
            rows.append(row)
            print(
                f"{item.label:<50} covid={item.covid} sigma={sigma:<4} "
                f"p={row['covid_probability']:.3f} lesion={row['lung_involvement_percent']:.2f}%",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"model": predictor.metadata.model_version, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
