"""Intensity scaling and resizing shared by training and inference.

One definition serves both sides so that a network trained on 8-bit PNG slices sees the
same kind of input when the node feeds it Hounsfield units:

* CT in Hounsfield units -> the lung window (centre -600 HU, width 1500 HU, i.e. -1350..150
  HU, the usual radiological lung window in which the published 8-bit slices were mostly
  shown) -> linear map to [0, 1], clipped.
* 8-bit images (PNG/JPG) -> divide by 255.
* Resizing to the network grid is bilinear with antialiasing (downsampling 512 -> 256 must
  not alias fine ground-glass texture); the probability map goes back to the source grid
  bilinearly, so it stays in [0, 1] and a 0.5 threshold keeps a blob's position and size.
  Both run batched on whatever device the tensors are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HUWindow:
    """A display window in Hounsfield units."""

    center: float = -600.0
    width: float = 1500.0

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        return self.center + self.width / 2


LUNG_WINDOW = HUWindow()


def hu_to_unit(hu: torch.Tensor, window: HUWindow = LUNG_WINDOW) -> torch.Tensor:
    """Hounsfield units -> [0, 1] through ``window`` (float32 out)."""
    if window.width <= 0:
        raise ValueError(f"window width must be positive, got {window.width}")
    x = (hu.float() - window.low) / window.width
    return x.clamp_(0.0, 1.0)


def uint8_to_unit(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """8-bit grey values -> [0, 1] float32."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    return t.float().div_(255.0)


def resize_slices(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a batch of slices (N, H, W) or (N, C, H, W) to ``size``; a no-op when equal."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    target = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) != tuple(target):
        downsampling = x.shape[-2] > target[0] or x.shape[-1] > target[1]
        x = F.interpolate(
            x.float(), size=target, mode="bilinear", align_corners=False, antialias=downsampling
        )
    return x.squeeze(1) if squeeze else x
