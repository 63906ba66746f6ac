"""``ctmtl-train evaluate``: score a checkpoint the way the product owner scores releases.

Runs ``mtl_model.Predictor`` (the node's own inference path) on

* the UCSD COVID-CT split lists (``--split``): every image made grey and resized to the
  network grid exactly as in training, slice COVID probability vs. the class folder;
* MedSeg slices (``--medseg``, PNG folder or NIfTI pair): the lesion probability on the
  source 512x512 grid, thresholded at 0.5, vs. the mask. For ``--split test`` the whole
  MedSeg folder is scored (the product owner's held-back slices); for ``train``/``val`` the
  fixed split (every 5th sorted slice is validation).

JSON (DESIGN.md contract, extra keys allowed)::

    {"classification": {"auc", "accuracy", "sensitivity", "specificity", "n", ...},
     "segmentation": {"dice", "dice_pooled", "n", ...}, ...}

``dice`` is the mean per-slice Dice at 0.5, ``dice_pooled`` pools all slices. Extra keys:
bootstrap 95% intervals (``auc_ci95``, ``dice_ci95``, ``dice_pooled_ci95``), threshold,
checkpoint identity. Undefined values (e.g. AUC with one class) are ``null``. Beside the
JSON, a report folder gets ``roc.png``, ``overlays/*.png`` (truth green, prediction red),
per-item CSVs and ``report.md``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_model import Predictor, resize_slices
from mtl_model.metrics import (
    auc_ci,
    classification_metrics,
    dice_cis,
    dice_counts,
    dice_from_counts,
    write_roc_png,
)
from training.data import (
    DataError,
    covid_ct_files,
    find_nifti_pair,
    medseg_png_pairs,
    read_binary_mask,
    read_gray_image,
    read_nifti_volumes,
    split_indices,
)

logger = logging.getLogger(__name__)

THRESHOLD = 0.5
MAX_OVERLAYS = 40


def _clean(v: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python (strict JSON)."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def default_medseg_split(split: str) -> str:
    return split if split in ("train", "val") else "all"


def medseg_slices(
    root: Path, split: str, val_every: int = 5, val_offset: int = 0
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, (N, H, W) float images in [0, 1] and (N, H, W) bool masks of a MedSeg folder."""
    root = Path(root)
    if (root / "images").is_dir():
        pairs = medseg_png_pairs(root, split, val_every, val_offset)
        imgs = [read_gray_image(i) for i, _ in pairs]
        masks = [read_binary_mask(m) for _, m in pairs]
        shapes = {a.shape for a in imgs} | {m.shape for m in masks}
        if len(shapes) != 1:
            raise DataError(f"MedSeg slices in {root} differ in size: {sorted(shapes)}")
        return (
            [i.name for i, _ in pairs],
            np.stack(imgs).astype(np.float32) / 255.0,
            np.stack(masks),
        )
    image_path, mask_path = find_nifti_pair(root)
    vol, mask = read_nifti_volumes(image_path, mask_path)
    idx = split_indices(vol.shape[0], split, val_every, val_offset)
    return [f"{image_path.name}#{i}" for i in idx], vol[idx], mask[idx]


def ucsd_network_input(path: Path, size: int) -> np.ndarray:
    """A UCSD figure as the network sees it: grey / 255, resized to the grid, in [0, 1]."""
    img = torch.from_numpy(read_gray_image(path)).float().div_(255.0)[None]
    return resize_slices(img, size)[0].clamp_(0.0, 1.0).numpy()


def evaluate_classification(
    predictor: Predictor, root: Path, split: str, n_boot: int = 2000
) -> tuple[dict[str, Any], list[tuple[str, int, float]]]:
    """Metrics and (name, label, probability) rows on a UCSD split."""
    items = covid_ct_files(root, split)
    size = predictor.input_size
    probs: list[float] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            pred = predictor.predict_unit(np.stack(batch))
            assert pred.slice_covid_probability is not None
            probs.extend(float(p) for p in pred.slice_covid_probability)
            batch.clear()

    for path, _ in items:
        batch.append(ucsd_network_input(path, size))
        if len(batch) >= predictor.batch_size:
            flush()
    flush()
    labels = np.array([int(lab) for _, lab in items])
    p = np.array(probs)
    res: dict[str, Any] = dict(classification_metrics(labels, p, THRESHOLD))
    res["auc_ci95"] = list(auc_ci(labels, p, n_boot=n_boot))
    res["threshold"] = THRESHOLD
    res["n_covid"] = int(labels.sum())
    res["n_non_covid"] = int((1 - labels).sum())
    res["split"] = split
    rows = [
        (f"{path.parent.name}/{path.name}", int(lab), float(pr))
        for (path, lab), pr in zip(items, probs, strict=True)
    ]
    return res, rows


def evaluate_segmentation(
    predictor: Predictor, root: Path, split: str, n_boot: int = 2000
) -> tuple[dict[str, Any], list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Metrics plus names, images, truth, probabilities and per-slice Dice."""
    names, images, truth = medseg_slices(root, split)
    if not names:
        raise DataError(f"no MedSeg slices in {root} for split {split!r}")
    pred = predictor.predict_unit(images)
    assert pred.lesion_probability is not None
    prob = pred.lesion_probability
    inter, sizes = dice_counts(prob >= THRESHOLD, truth)
    per = dice_from_counts(inter, sizes)
    mean_ci, pooled_ci = dice_cis(inter, sizes, n_boot=n_boot)
    res: dict[str, Any] = {
        "dice": float(per.mean()),
        "dice_pooled": float(2.0 * inter.sum() / sizes.sum()) if sizes.sum() > 0 else 1.0,
        "n": len(names),
        "dice_ci95": list(mean_ci),
        "dice_pooled_ci95": list(pooled_ci),
        "dice_median": float(np.median(per)),
        "threshold": THRESHOLD,
        "split": split,
        "grid": list(images.shape[1:]),
    }
    return res, names, images, truth, prob, per


def write_overlay_png(image: np.ndarray, truth: np.ndarray, prob: np.ndarray, path: Path) -> None:
    """Grey slice with the true lesion outlined green and the predicted one red."""
    from PIL import Image

    g = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    rgb = np.stack([g, g, g], axis=-1)
    pred = prob >= THRESHOLD

    def edge(m: np.ndarray) -> np.ndarray:
        m = m.astype(bool)
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        return m & ~inner

    tint = rgb.astype(np.float32)
    tint[pred] = 0.6 * tint[pred] + 0.4 * np.array([255, 0, 0], np.float32)
    rgb = tint.astype(np.uint8)
    rgb[edge(truth)] = (0, 255, 0)
    rgb[edge(pred)] = (255, 40, 40)
    Image.fromarray(rgb).save(path)


def _write_csv(path: Path, header: list[str], rows: list[tuple[Any, ...]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def write_report(result: dict[str, Any], report_dir: Path) -> Path:
    """A short Markdown report of one evaluation."""
    ck = result.get("checkpoint", {})
    lines = [
        "# ctmtl evaluation report",
        "",
        f"- checkpoint: `{ck.get('path')}` ({ck.get('model_name')} {ck.get('model_version')}, "
        f"device UID {ck.get('device_uid')})",
        f"- evaluated: {result.get('evaluated')} on {result.get('device')} "
        f"({result.get('engine', 'torch')} {result.get('precision')})",
        "",
    ]
    c = result.get("classification")
    if c:
        lo, hi = (c.get("auc_ci95") or [None, None])[:2]
        lines += [
            f"## Classification (UCSD COVID-CT, split `{c.get('split')}`)",
            "",
            "| metric | value |",
            "|---|---|",
            f"| AUC | {_fmt(c.get('auc'))} (95% CI {_fmt(lo)}-{_fmt(hi)}) |",
            f"| accuracy @0.5 | {_fmt(c.get('accuracy'))} |",
            f"| sensitivity @0.5 | {_fmt(c.get('sensitivity'))} |",
            f"| specificity @0.5 | {_fmt(c.get('specificity'))} |",
            f"| n (COVID / non-COVID) | {c.get('n')} ({c.get('n_covid')} / "
            f"{c.get('n_non_covid')}) |",
            "",
            "![ROC](roc.png)",
            "",
        ]
    s = result.get("segmentation")
    if s:
        lo, hi = (s.get("dice_ci95") or [None, None])[:2]
        plo, phi = (s.get("dice_pooled_ci95") or [None, None])[:2]
        lines += [
            f"## Segmentation (MedSeg, portion `{s.get('split')}`, grid {s.get('grid')})",
            "",
            "| metric | value |",
            "|---|---|",
            f"| mean per-slice Dice @0.5 | {_fmt(s.get('dice'))} (95% CI {_fmt(lo)}-{_fmt(hi)}) |",
            f"| pooled Dice @0.5 | {_fmt(s.get('dice_pooled'))} (95% CI {_fmt(plo)}-{_fmt(phi)}) |",
            f"| median per-slice Dice | {_fmt(s.get('dice_median'))} |",
            f"| n slices | {s.get('n')} |",
            "",
            "Overlays in `overlays/`: true lesion outlined green, predicted lesion red.",
            "",
        ]
    lines += [
        "Intervals: percentile bootstrap over images/slices (seeded). The sets are small, so "
        "the intervals are wide; compare releases on them, not on point values alone.",
        "",
        "Not a medical device; research use only.",
        "",
    ]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def evaluate(
    checkpoint: str | Path | None = None,
    covid_ct: str | Path | None = None,
    split: str = "test",
    medseg: str | Path | None = None,
    medseg_split: str | None = None,
    json_out: str | Path | None = None,
    report_dir: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    n_boot: int = 2000,
    predictor: Predictor | None = None,
    engine: str = "torch",
) -> dict[str, Any]:
    """Score a checkpoint; writes the JSON (if ``json_out``) and the report folder.

    ``engine`` (torch, openvino, auto) and ``precision`` as for ``mtl_model.Predictor``.
    """
    if covid_ct is None and medseg is None:
        raise ValueError("nothing to evaluate: give covid_ct and/or medseg")
    if predictor is None:
        predictor = Predictor(
            checkpoint,
            device=device,
            precision=precision,
            batch_size=batch_size,
            engine=engine,
        )
    meta = predictor.metadata
    tasks = predictor.tasks
    if report_dir is None and json_out is not None:
        jp = Path(json_out)
        report_dir = jp.with_name(f"{jp.stem}_report")
    rdir = Path(report_dir) if report_dir is not None else None
    if rdir is not None:
        rdir.mkdir(parents=True, exist_ok=True)

    result: dict[str, Any] = {}
    if covid_ct is not None:
        if "classification" in tasks:
            cres, rows = evaluate_classification(predictor, Path(covid_ct), split, n_boot)
            result["classification"] = cres
            logger.info("classification on %s/%s: %s", covid_ct, split, cres)
            if rdir is not None:
                labels = np.array([r[1] for r in rows])
                probs = np.array([r[2] for r in rows])
                write_roc_png(
                    labels, probs, cres["auc"], rdir / "roc.png", "COVID-19 vs non-COVID (slice)"
                )
                _write_csv(rdir / "classification.csv", ["image", "label", "probability"], rows)
        else:
            result["classification"] = {
                "auc": None,
                "accuracy": None,
                "sensitivity": None,
                "specificity": None,
                "n": 0,
                "note": "the checkpoint has no classification head",
            }
    if medseg is not None:
        mss = medseg_split or default_medseg_split(split)
        if "segmentation" in tasks:
            sres, names, images, truth, prob, per = evaluate_segmentation(
                predictor, Path(medseg), mss, n_boot
            )
            result["segmentation"] = sres
            logger.info("segmentation on %s/%s: %s", medseg, mss, sres)
            if rdir is not None:
                _write_csv(
                    rdir / "segmentation.csv",
                    ["slice", "dice", "true_pixels", "predicted_pixels"],
                    [
                        (n, float(d), int(t.sum()), int((p >= THRESHOLD).sum()))
                        for n, d, t, p in zip(names, per, truth, prob, strict=True)
                    ],
                )
                odir = rdir / "overlays"
                odir.mkdir(exist_ok=True)
                for i in range(min(len(names), MAX_OVERLAYS)):
                    stem = Path(names[i].replace("#", "_")).stem
                    write_overlay_png(images[i], truth[i], prob[i], odir / f"{stem}.png")
        else:
            result["segmentation"] = {
                "dice": None,
                "dice_pooled": None,
                "n": 0,
                "note": "the checkpoint has no segmentation head",
            }
    result["checkpoint"] = {
        "path": str(checkpoint) if checkpoint is not None else "(in-memory or default)",
        "model_name": meta.model_name,
        "model_version": meta.model_version,
        "device_uid": meta.device_uid,
        "architecture": meta.architecture.model_dump(),
    }
    result["device"] = str(predictor.device)
    result["engine"] = predictor.engine
    result["precision"] = predictor.precision
    result["evaluated"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["inputs"] = {
        "covid_ct": str(covid_ct) if covid_ct is not None else None,
        "split": split,
        "medseg": str(medseg) if medseg is not None else None,
    }
    result = _clean(result)
    if rdir is not None:
        write_report(result, rdir)
        result["report_dir"] = str(rdir)
    if json_out is not None:
        jp = Path(json_out)
        jp.parent.mkdir(parents=True, exist_ok=True)
        tmp = jp.with_name(f".{jp.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, jp)
    return result
