"""Masked multi-task losses: each term uses only the samples that carry its label."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.config import LossConfig
from training.losses import MultiTaskLoss, soft_dice


def _batch(has_mask: list[bool], has_label: list[bool]) -> dict[str, torch.Tensor]:
    n = len(has_mask)
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(n, 1, 8, 8, generator=g),
        "mask": (torch.rand(n, 1, 8, 8, generator=g) > 0.7).float(),
        "has_mask": torch.tensor(has_mask),
        "label": torch.tensor([1.0, 0.0, 1.0, 0.0][:n]),
        "has_label": torch.tensor(has_label),
    }


def _outputs(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "reconstruction": torch.rand(n, 1, 8, 8, generator=g).requires_grad_(),
        "segmentation": torch.randn(n, 1, 8, 8, generator=g).requires_grad_(),
        "classification": torch.randn(n, generator=g).requires_grad_(),
    }


def test_soft_dice_hand_value() -> None:
    logits = torch.full((1, 1, 2, 2), 100.0)  # p = 1 everywhere
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # (2*2 + 1) / (4 + 2 + 1)
    assert soft_dice(logits, target, 1.0).item() == pytest.approx(5 / 7)


def test_terms_use_only_labelled_samples() -> None:
    b = _batch([True, False, False, True], [True, True, False, False])
    out = _outputs(4)
    total, parts = MultiTaskLoss(LossConfig())(out, b)
    mse = F.mse_loss(out["reconstruction"], b["image"])
    dice = soft_dice(out["segmentation"][[0, 3]], b["mask"][[0, 3]]).mean()
    bce = F.binary_cross_entropy_with_logits(out["classification"][:2], b["label"][:2])
    assert parts["mse"] == pytest.approx(mse.item(), rel=1e-5)
    assert parts["dice"] == pytest.approx(dice.item(), rel=1e-5)
    assert parts["bce"] == pytest.approx(bce.item(), rel=1e-5)
    assert total.item() == pytest.approx((mse - dice + bce).item(), rel=1e-5)
    total.backward()
    # unlabelled samples get no gradient from the masked terms
    assert torch.all(out["segmentation"].grad[[1, 2]] == 0)
    assert torch.all(out["classification"].grad[[2, 3]] == 0)
    assert torch.any(out["segmentation"].grad[0] != 0)


def test_batch_without_any_mask_or_label() -> None:
    b = _batch([False, False], [False, False])
    out = _outputs(2)
    total, parts = MultiTaskLoss(LossConfig(reconstruction=0.5))(out, b)
    assert "dice" not in parts and "bce" not in parts
    assert total.item() == pytest.approx(0.5 * parts["mse"], rel=1e-5)
    total.backward()
    # heads still get a (zero) gradient, as DistributedDataParallel needs
    assert out["segmentation"].grad is not None
    assert torch.all(out["segmentation"].grad == 0)
    assert torch.all(out["classification"].grad == 0)


def test_task_weights_and_missing_heads() -> None:
    b = _batch([True, True], [True, True])
    out = _outputs(2)
    seg_only = {"segmentation": out["segmentation"]}
    total, parts = MultiTaskLoss(LossConfig(segmentation=2.0))(seg_only, b)
    assert set(parts) == {"dice", "loss"}
    assert total.item() == pytest.approx(-2.0 * parts["dice"], rel=1e-5)
