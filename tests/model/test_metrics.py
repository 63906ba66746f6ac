"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtl_model.metrics import (
    auc_ci,
    bootstrap_ci,
    classification_metrics,
    dice_cis,
    dice_counts,
    dice_from_counts,
    roc_auc,
    roc_curve,
    segmentation_metrics,
)


def test_auc_hand_cases() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(np.array([0, 1, 0, 1]), np.full(4, 0.5)) == 0.5
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.2, 0.5, 0.5, 0.9])) == 0.875
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_roc_curve_endpoints_and_area() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])
    fpr, tpr, _thr = roc_curve(y, s)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert trapezoid == pytest.approx(roc_auc(y, s))


def test_classification_metrics_at_threshold() -> None:
    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.5, 0.1])  # TP TP FN FP(0.5 >= 0.5) TN
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["n"] == 5


def test_dice_per_slice_and_pooled() -> None:
    truth = np.zeros((3, 4, 4), bool)
    pred = np.zeros((3, 4, 4), bool)
    truth[0, :2, :2] = True  # 4 px
    pred[0, :2, :1] = True  # 2 px, all inside -> 2*2/(4+2) = 2/3
    truth[1, 0, 0] = True  # 1 px, nothing predicted -> 0
    # slice 2: both empty -> 1
    inter, sizes = dice_counts(pred, truth)
    np.testing.assert_allclose(dice_from_counts(inter, sizes), [2 / 3, 0.0, 1.0])
    m = segmentation_metrics(pred.astype(float), truth)
    assert m["dice"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert m["dice_pooled"] == pytest.approx(2 * 2 / (4 + 2 + 1))
    assert m["n"] == 3


def test_bootstrap_intervals() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    p = np.clip(y * 0.3 + rng.random(80) * 0.7, 0, 1)
    lo, hi = auc_ci(y, p, n_boot=300, seed=5)
    est = roc_auc(y, p)
    assert lo <= est <= hi and hi - lo > 0.01
    assert auc_ci(y, p, n_boot=300, seed=5) == (lo, hi)  # seeded
    const = bootstrap_ci(lambda idx: 0.7, 10, n_boot=50)
    assert const == pytest.approx((0.7, 0.7))
    inter = np.array([2.0, 0.0, 5.0])
    sizes = np.array([6.0, 1.0, 10.0])
    (mlo, mhi), (plo, phi) = dice_cis(inter, sizes, n_boot=200)
    assert 0.0 <= mlo <= mhi <= 1.0 and 0.0 <= plo <= phi <= 1.0
