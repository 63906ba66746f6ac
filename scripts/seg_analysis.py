"""Where the lesion Dice of a checkpoint is lost: grid, fit, and whether flip averaging helps.

Prints, for the MedSeg train and val slices (the fixed split) and the UCSD val split:

* the grid ceiling: Dice of the true masks after the round trip to the network grid and back
  (binary at the grid, as training sees them), i.e. the best any model at that grid can do;
* the checkpoint's mean / median / pooled Dice at 0.5 on the source grid, as
  ``ctmtl-train evaluate`` computes it, on the slices it trained on and on the held-out ones;
* test-time flips (``--flips``): lesion and COVID probabilities averaged over mirrored
  inputs (horizontal, vertical, both), against no flipping.

    python scripts/seg_analysis.py [--checkpoint P] [--data ../shared/data] [--flips]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mtl_model import Predictor, resize_slices
from mtl_model.checkpoint import default_checkpoint_path
from mtl_model.metrics import classification_metrics, dice_counts, dice_from_counts
from training.config import default_data_root
from training.data import covid_ct_files, masks_to_grid
from training.evaluate import medseg_slices, ucsd_network_input

FLIPS: dict[str, list[tuple[int, ...]]] = {
    "none": [()],
    "horizontal": [(), (3,)],
    "horizontal+vertical": [(), (3,), (2,)],
    "all four": [(), (3,), (2,), (2, 3)],
}


def dice_line(pred: np.ndarray, truth: np.ndarray) -> str:
    inter, sizes = dice_counts(pred, truth)
    per = dice_from_counts(inter, sizes)
    pooled = 2.0 * inter.sum() / sizes.sum()
    return f"mean {per.mean():.4f}  median {np.median(per):.4f}  pooled {pooled:.4f}"


def flipped(p: Predictor, x: torch.Tensor, flips: list[tuple[int, ...]]) -> tuple[np.ndarray, ...]:
    """Lesion (N, H, W) and COVID (N,) probabilities averaged over flipped copies of x."""
    seg, cls = [], []
    with torch.inference_mode():
        for start in range(0, x.shape[0], p.batch_size):
            xb = x[start : start + p.batch_size]
            s_sum, c_sum = torch.zeros_like(xb), torch.zeros(xb.shape[0])
            for dims in flips:
                inp = torch.flip(xb, dims) if dims else xb
                out = p.model(inp.to(p.dtype).contiguous(memory_format=torch.channels_last))
                s = torch.sigmoid(out["segmentation"].float())
                s_sum += torch.flip(s, dims) if dims else s
                c_sum += torch.sigmoid(out["classification"].float()).reshape(-1)
            seg.append(s_sum / len(flips))
            cls.append(c_sum / len(flips))
    return torch.cat(seg).numpy(), torch.cat(cls).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint_path())
    ap.add_argument("--data", type=Path, default=default_data_root())
    ap.add_argument("--flips", action="store_true", help="also score test-time flips (slow)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = Predictor(args.checkpoint, device="cpu", batch_size=16)
    print(f"{p.metadata.model_version} on {args.data}, grid {p.input_size}")
    medseg = {s: medseg_slices(args.data / "medseg-100", s) for s in ("train", "val")}
    for split, (_, images, truth) in medseg.items():
        grid = masks_to_grid(list(truth), p.input_size).float()  # what training sees
        back = resize_slices(grid, truth.shape[1:])[:, 0].numpy() >= 0.5
        label = f"MedSeg {split:5s} ({len(truth)} slices)"
        print(f"{label} grid ceiling: {dice_line(back, truth)}")
        prob = p.predict_unit(images).lesion_probability
        assert prob is not None
        print(f"{label} checkpoint:   {dice_line(prob >= 0.5, truth)}")
    if not args.flips:
        return
    _, images, truth = medseg["val"]
    x_seg = resize_slices(torch.from_numpy(images)[:, None], p.input_size)
    items = covid_ct_files(args.data / "covid-ct", "val")
    x_cls = torch.from_numpy(np.stack([ucsd_network_input(f, p.input_size) for f, _ in items]))
    x_cls = x_cls[:, None]  # (N, 1, H, W)
    labels = np.array([int(lab) for _, lab in items])
    for name, flips in FLIPS.items():
        seg, _ = flipped(p, x_seg, flips)
        prob = resize_slices(torch.from_numpy(seg), truth.shape[1:])[:, 0].numpy()
        _, covid = flipped(p, x_cls, flips)
        auc = classification_metrics(labels, covid, 0.5)["auc"]
        print(
            f"flips {name:20s} MedSeg val {dice_line(prob >= 0.5, truth)}  UCSD val AUC {auc:.4f}"
        )


if __name__ == "__main__":
    main()
