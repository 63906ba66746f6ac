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
* The classifier may see only the lung region (``classifier_input = "lung_box"`` in a
  checkpoint's preprocessing): every slice of a series is cut to one square around the
  series' lung mask (:func:`lung_box`: the lungs' extent over all slices plus a margin of
  :data:`LUNG_BOX_MARGIN` of it on every side, so the chest wall and the pleura stay in;
  outside that rectangle air) and resized to the grid (:func:`crop_to_box`). What lies
  outside the chest then cannot count: the field of view, the patient table, the body
  outline. An 8-layer CNN trained on whole slices called a lung-cancer series COVID-19
  at 0.98 and at 0.11 when given its lung box; the table of that PET-CT scanner was the
  cue (docs/experiments.md, seventh session).
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
#: air, the fill of a lung box where it reaches outside the image
AIR_HU = -1000.0
#: margin of the lung box on each side, as a fraction of the lungs' larger extent
LUNG_BOX_MARGIN = 0.08
Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open), may reach outside the image


def hu_to_unit(hu: torch.Tensor, window: HUWindow = LUNG_WINDOW) -> torch.Tensor:
    """Hounsfield units -> [0, 1] through ``window`` (float32 out)."""
    if window.width <= 0:
        raise ValueError(f"window width must be positive, got {window.width}")
    x = (hu.float() - window.low) / window.width
    return x.clamp_(0.0, 1.0)


def unit_to_hu(x: np.ndarray, window: HUWindow = LUNG_WINDOW) -> np.ndarray:
    """[0, 1] values of a windowed image back to the HU its window implies (float32).

    8-bit lung-window slices (LUNA16, MedSeg PNG) get HU this way, so the HU lung mask
    works on them; values clipped by the window come back as the window's ends.
    """
    return (np.asarray(x, dtype=np.float32) * window.width + window.low).astype(np.float32)


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


@dataclass(frozen=True)
class LungBox:
    """Where the classifier looks: the lungs' extent plus a margin (``content``), inside a
    square of the same centre (``square``) that becomes the network grid. Both are
    (y0, y1, x0, x1), half-open, and may reach outside the image."""

    square: Box
    content: Box


def lung_box(lung: np.ndarray, margin: float = LUNG_BOX_MARGIN) -> LungBox | None:
    """The lung box of a lung mask's in-plane extent over all its slices (None if empty).

    ``lung`` is (Z, Y, X) or (Y, X) bool. ``content`` is the extent grown by ``margin`` of
    the larger side on every side; ``square`` has that larger side, centred on it.
    """
    m = np.asarray(lung, dtype=bool)
    if m.ndim == 3:
        m = np.asarray(m.any(axis=0))
    if m.ndim != 2:
        raise ValueError(f"expected a (Z, Y, X) or (Y, X) mask, got shape {lung.shape}")
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    grow = int(np.ceil(margin * max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])))
    content = (
        int(rows[0]) - grow,
        int(rows[-1]) + 1 + grow,
        int(cols[0]) - grow,
        int(cols[-1]) + 1 + grow,
    )
    side = max(content[1] - content[0], content[3] - content[2])
    y0 = (content[0] + content[1] - side) // 2
    x0 = (content[2] + content[3] - side) // 2
    return LungBox((y0, y0 + side, x0, x0 + side), content)


def crop_to_box(x: torch.Tensor, box: LungBox, fill: float) -> torch.Tensor:
    """Cut (..., H, W) to ``box.square``; what lies outside ``box.content`` (the table,
    the image's own border) becomes ``fill``."""
    y0, y1, x0, x1 = box.square
    c0, c1, d0, d1 = box.content
    h, w = x.shape[-2:]
    out = x.new_full((*x.shape[:-2], y1 - y0, x1 - x0), fill)
    sy0, sy1 = max(0, y0, c0), min(h, y1, c1)
    sx0, sx1 = max(0, x0, d0), min(w, x1, d1)
    if sy0 < sy1 and sx0 < sx1:
        out[..., sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = x[..., sy0:sy1, sx0:sx1]
    return out
