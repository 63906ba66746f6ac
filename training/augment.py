"""Batched augmentation on the training device: geometry, intensity and window jitter.

Why each part:

* geometry (flip, rotation, scale, shift; image and mask warped together, the mask
  re-thresholded at 0.5): 600 slices are few, and UCSD figures are cropped and framed
  arbitrarily;
* window jitter (random remap ``(x - a) / (b - a)`` with ``a, b`` near 0 and 1) and gamma:
  UCSD figures come in whatever window their authors chose, and the node feeds HU through
  one fixed lung window, so the network must not depend on one exact grey mapping;
* blur and noise: figures are often re-compressed, downscaled JPEGs, while DICOM is sharp.

All random draws come from the ``torch.Generator`` passed in, so a resumed run repeats the
same augmentation for the same epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment (N, 1, H, W) images in [0, 1] and their (N, 1, H, W) 0/1 masks."""
    if not cfg.enabled:
        return images, masks
    n = images.shape[0]
    dev = images.device
    g = generator
    # geometry: inverse affine map output -> input in normalised coordinates
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, g) * math.pi / 180.0
    scale = torch.exp(_uniform(n, math.log(cfg.scale[0]), math.log(cfg.scale[1]), g))
    flip = torch.where(torch.rand(n, generator=g) < cfg.hflip, -1.0, 1.0)
    tx = _uniform(n, -cfg.translate, cfg.translate, g) * 2.0
    ty = _uniform(n, -cfg.translate, cfg.translate, g) * 2.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, tx], dim=1),
            torch.stack([sin * flip, cos, ty], dim=1),
        ],
        dim=1,
    ).to(dev, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = F.grid_sample(
        masks.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    m = (m >= 0.5).to(masks.dtype)
    # window jitter
    j = cfg.window_jitter
    if j > 0:
        a = _uniform(n, -j, j, g).to(dev).view(n, 1, 1, 1)
        b = (1.0 + _uniform(n, -j, j, g)).to(dev).view(n, 1, 1, 1)
        x = ((x - a) / (b - a)).clamp(0.0, 1.0)
    # gamma
    lo, hi = cfg.gamma
    if (lo, hi) != (1.0, 1.0):
        gam = torch.exp(_uniform(n, math.log(lo), math.log(hi), g)).to(dev).view(n, 1, 1, 1)
        x = x.clamp_min(1e-6).pow(gam)
    # blur (fixed 3x3 Gaussian, sigma ~0.8) on a random subset
    if cfg.blur_prob > 0:
        k1 = torch.tensor([0.27, 0.46, 0.27], device=dev, dtype=x.dtype)
        kernel = (k1[:, None] * k1[None, :]).view(1, 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
        sel = (torch.rand(n, generator=g) < cfg.blur_prob).to(dev).view(n, 1, 1, 1)
        x = torch.where(sel, blurred, x)
    # noise
    if cfg.noise_std > 0:
        std = _uniform(n, 0.0, cfg.noise_std, g).to(dev).view(n, 1, 1, 1)
        noise = torch.randn(x.shape, generator=g).to(dev)
        x = x + std * noise
    return x.clamp(0.0, 1.0), m
