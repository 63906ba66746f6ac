"""Evaluation metrics with their small-sample uncertainty.

* ROC AUC by the Mann-Whitney statistic with average ranks for ties (no scikit-learn).
* Accuracy, sensitivity, specificity at a probability threshold (0.5).
* Dice per slice at threshold 0.5 (a slice where both truth and prediction are empty
  scores 1) and pooled Dice over all slices (sum of intersections over sum of sizes).
* Percentile bootstrap 95% intervals, resampling slices (images) with replacement, seeded.

Shared by training (slice and pixel figures) and the node (``ctmtl-node evaluate``, series
figures), so that a series AUC and a slice AUC are the same computation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending, starting at (0, 0)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thr = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thr


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5
) -> dict[str, float | int]:
    """AUC, accuracy, sensitivity, specificity (prediction positive when p >= threshold)."""
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    pred = p >= threshold
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {
        "auc": roc_auc(y, p),
        "accuracy": (tp + tn) / y.size if y.size else float("nan"),
        "sensitivity": tp / n_pos if n_pos else float("nan"),
        "specificity": tn / n_neg if n_neg else float("nan"),
        "n": int(y.size),
    }


def dice_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (intersection, |pred| + |truth|) for (N, ...) boolean arrays."""
    p = np.asarray(pred).astype(bool).reshape(len(pred), -1)
    t = np.asarray(truth).astype(bool).reshape(len(truth), -1)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ")
    inter = (p & t).sum(1).astype(np.float64)
    sizes = (p.sum(1) + t.sum(1)).astype(np.float64)
    return inter, sizes


def dice_from_counts(inter: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per-slice Dice; 1 where both prediction and truth are empty."""
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(sizes > 0, 2.0 * inter / np.maximum(sizes, 1e-12), 1.0)
    return d


def segmentation_metrics(
    prob: np.ndarray, truth: np.ndarray, threshold: float = 0.5
) -> dict[str, float | int]:
    """Mean per-slice Dice and pooled Dice at ``threshold``."""
    inter, sizes = dice_counts(np.asarray(prob) >= threshold, truth)
    per = dice_from_counts(inter, sizes)
    pooled = 2.0 * inter.sum() / sizes.sum() if sizes.sum() > 0 else 1.0
    return {"dice": float(per.mean()), "dice_pooled": float(pooled), "n": len(per)}


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n_items: int,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(indices)`` over resamples of ``n_items`` items.

    Resamples where the statistic is undefined (NaN, e.g. AUC with one class) are dropped.
    """
    if n_items < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = np.array(
        [statistic(rng.integers(0, n_items, n_items)) for _ in range(n_boot)], dtype=np.float64
    )
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def auc_ci(labels: np.ndarray, probs: np.ndarray, **kw: float | int) -> tuple[float, float]:
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    return bootstrap_ci(lambda idx: roc_auc(y[idx], p[idx]), y.size, **kw)  # type: ignore[arg-type]


def dice_cis(
    inter: np.ndarray, sizes: np.ndarray, **kw: float | int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Bootstrap intervals of the mean per-slice Dice and of the pooled Dice."""
    per = dice_from_counts(inter, sizes)

    def pooled(idx: np.ndarray) -> float:
        s = sizes[idx].sum()
        return float(2.0 * inter[idx].sum() / s) if s > 0 else 1.0

    mean_ci = bootstrap_ci(lambda idx: float(per[idx].mean()), per.size, **kw)  # type: ignore[arg-type]
    pooled_ci = bootstrap_ci(pooled, per.size, **kw)  # type: ignore[arg-type]
    return mean_ci, pooled_ci


def write_roc_png(
    labels: np.ndarray, probs: np.ndarray, auc: float, path: Path, title: str
) -> None:
    """The ROC curve as a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
