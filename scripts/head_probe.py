"""Can the classifier head of a release learn real CT on its frozen encoder's features?

The CPU route of issue 12 that needs no new encoder: encode every training slice once
(``--views`` augmented copies of UCSD train, MedSeg train and the LUNA16 training
patients), retrain only the T3 head on the cached bottlenecks with balanced batches
(half UCSD, a quarter each MedSeg as COVID and LUNA16 as non-COVID), and after every
epoch score UCSD val (slice AUC) and the series of a labels CSV (the node's aggregation
over lung slices, whole slices as the head sees them). Nothing is written but the log.

    python scripts/head_probe.py --checkpoint release-0.3.0.safetensors \
        --series config/eval/shared_series.csv --epochs 8 --cache /tmp/features.pt
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from dicom_node.evaluate import load_series_input, read_labels
from mtl_model import Predictor, hu_to_unit, load_checkpoint, resize_slices
from mtl_model.lung import lung_mask
from mtl_model.metrics import roc_auc
from training.augment import augment_batch
from training.config import AugmentConfig, default_data_root
from training.data import load_covid_ct, load_medseg_png, load_png_stacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=Path, required=True, help="labels CSV of held-out series")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the release")
    ap.add_argument("--data", type=Path, default=default_data_root())
    ap.add_argument("--luna-train", nargs="+", default=["patient_1", "patient_2"])
    ap.add_argument("--views", type=int, default=4, help="1 plain + augmented copies")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60, help="steps per epoch")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--blur-sigma", type=float, default=0.0, help="augmentation, 0 = fixed 3x3")
    ap.add_argument("--cache", type=Path, default=None, help="features file (made if missing)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model, meta = load_checkpoint(args.checkpoint)
    if meta.architecture.classifier_pooling == "image_cnn8":
        raise SystemExit(
            f"{meta.model_version}: its classifier has an input of its own, not a head on the "
            "encoder; give a release with a T3 head (0.3.0: git show "
            "15dd798:mtl_model/weights/ctmtl-release.safetensors > release-0.3.0.safetensors)"
        )
    size = meta.architecture.input_size
    encoder = model.get_submodule("encoder").eval().to(torch.bfloat16)
    aug = AugmentConfig(
        blur_prob=0.5 if args.blur_sigma else 0.2, blur_sigma=(0.0, args.blur_sigma)
    )
    g = torch.Generator().manual_seed(1)

    def encode(x: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), 16):
                out.append(encoder(x[i : i + 16].to(torch.bfloat16))[1].half())
        return torch.cat(out)

    def views(images: torch.Tensor, n: int) -> torch.Tensor:
        x = images.float() / 255.0
        out = [encode(x)]
        for _ in range(n - 1):
            out.append(encode(augment_batch(x, torch.zeros_like(x), aug, g)[0]))
        return torch.cat(out)

    t0 = time.perf_counter()
    d = args.data
    if args.cache is not None and args.cache.is_file():
        sources, val_x, val_y, held = torch.load(args.cache, weights_only=False)
    else:
        sets = {
            "ucsd": load_covid_ct(d / "covid-ct", "train", size),
            "medseg": load_medseg_png(d / "medseg-100", "train", size),  # labelled COVID
            "luna": load_png_stacks(d / "luna16-3", "train", size, False, args.luna_train),
        }
        sources = {
            name: (views(s.images, args.views), s.labels.repeat(args.views))
            for name, s in sets.items()
        }
        val = load_covid_ct(d / "covid-ct", "val", size)
        val_x, val_y = encode(val.images.float() / 255.0), val.labels.numpy()
        held = []
        for item in read_labels(args.series):
            series = load_series_input(item.path)
            in_lung = np.asarray(lung_mask(series.hu, series.spacing).any(axis=(1, 2)))
            x = resize_slices(hu_to_unit(torch.from_numpy(series.hu)).unsqueeze(1), size)
            held.append((item.label, encode(x.clamp(0, 1)), in_lung))
        if args.cache is not None:
            torch.save((sources, val_x, val_y, held), args.cache)
    print(f"features in {time.perf_counter() - t0:.0f} s", flush=True)

    release_head = model.classification
    assert isinstance(release_head, torch.nn.Module)
    head = copy.deepcopy(release_head).float()
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=1e-2)
    share = {"ucsd": 16, "medseg": 8, "luna": 8}

    def probs(x: torch.Tensor) -> np.ndarray:
        head.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), 64):
                chunk = x[i : i + 64].float()
                with torch.autocast("cpu", torch.bfloat16):
                    out.append(torch.sigmoid(head(chunk).float()))
        return torch.cat(out).numpy()

    def report(tag: str) -> None:
        parts = [f"UCSD val AUC {roc_auc(val_y, probs(val_x)):.3f}"]
        for label, x, in_lung in held:
            series = Predictor.aggregate_series(probs(x), in_lung)
            parts.append(f"{Path(label).name} {series:.3f}")
        print(f"{tag}: " + ", ".join(parts), flush=True)

    report("release head")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(1, args.epochs + 1):
        head.train()
        for _ in range(args.steps):
            xs, ys = [], []
            for name, k in share.items():
                feats, labels = sources[name]
                idx = torch.randint(0, len(feats), (k,), generator=g)
                xs.append(feats[idx])
                ys.append(labels[idx])
            batch = torch.cat(xs).float()
            with torch.autocast("cpu", torch.bfloat16):
                logits = head(batch).float()
            loss = loss_fn(logits, torch.cat(ys))
            opt.zero_grad()
            loss.backward()
            opt.step()
        report(f"epoch {epoch}")


if __name__ == "__main__":
    main()
