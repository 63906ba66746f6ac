"""The paper's global loss with per-sample label masks: MSE + (-Dice) + BCE, weighted.

UCSD slices have a class and no mask, MedSeg slices have a mask and a class: every term is
averaged over the samples that carry its label only. A batch without any mask (or class)
gives a zero term that still touches the head's outputs, so DistributedDataParallel sees a
gradient (zero) for every parameter in every step.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from training.config import LossConfig

logger = logging.getLogger(__name__)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Smoothed Dice per sample, (N,) in (0, 1]: (2|P.T| + s) / (|P| + |T| + s)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    return (2.0 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)


class MultiTaskLoss(nn.Module):
    """Weighted sum of the task losses for the heads present in ``outputs``."""

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig()

    def forward(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the total loss and its parts (floats, for logging)."""
        cfg = self.cfg
        total = torch.zeros((), device=batch["image"].device)
        parts: dict[str, float] = {}
        if "reconstruction" in outputs:
            mse = F.mse_loss(outputs["reconstruction"].float(), batch["image"].float())
            total = total + cfg.reconstruction * mse
            parts["mse"] = float(mse.detach())
        if "segmentation" in outputs:
            logits = outputs["segmentation"]
            sel = batch["has_mask"].bool()
            if bool(sel.any()):
                dice = soft_dice(logits[sel], batch["mask"][sel], cfg.dice_smooth).mean()
                total = total + cfg.segmentation * (-dice)
                parts["dice"] = float(dice.detach())
            else:
                total = total + 0.0 * logits.float().sum()
        if "classification" in outputs:
            logits = outputs["classification"].float()
            sel = batch["has_label"].bool()
            if bool(sel.any()):
                bce = F.binary_cross_entropy_with_logits(logits[sel], batch["label"][sel].float())
                total = total + cfg.classification * bce
                parts["bce"] = float(bce.detach())
            else:
                total = total + 0.0 * logits.sum()
        parts["loss"] = float(total.detach())
        return total, parts
