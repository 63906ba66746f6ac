"""What the overlay did to the screen, from two screenshots of the same canvas: the SEG's
lesion pixels mapped onto the canvas, and whether they (and nothing far from a segment)
changed colour towards the segment's display colour."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# a screen pixel "changed" when one channel moved by more than this (8-bit)
CHANGE_LEVEL = 12
# and "towards the colour" when the change points at the colour within ~25 degrees (RGB)
MIN_COSINE = 0.9


@dataclass(frozen=True)
class ImageToCanvas:
    """Affine map from image (row, column) pixel centres to canvas (x, y) CSS pixels, from
    where the viewer draws three pixel centres (`viewport.worldToCanvas`)."""

    origin: np.ndarray  # canvas position of pixel (0, 0)
    per_row: np.ndarray  # canvas step for one row down
    per_column: np.ndarray  # canvas step for one column right

    @classmethod
    def from_corners(
        cls, p00: list[float], p0c: list[float], pr0: list[float], rows: int, columns: int
    ) -> ImageToCanvas:
        o = np.asarray(p00, dtype=float)
        return cls(
            origin=o,
            per_row=(np.asarray(pr0, dtype=float) - o) / (rows - 1),
            per_column=(np.asarray(p0c, dtype=float) - o) / (columns - 1),
        )

    def to_canvas(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """(N, 2) canvas x, y of the given pixel centres."""
        return (
            self.origin[None, :]
            + rows[:, None] * self.per_row[None, :]
            + columns[:, None] * self.per_column[None, :]
        )

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) continuous row, column of canvas points."""
        matrix = np.stack([self.per_row, self.per_column], axis=1)  # [x y] = M [r c] + o
        return np.linalg.solve(matrix, (xy - self.origin[None, :]).T).T


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by `steps` pixels (8-neighbourhood), numpy only."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[1:, 1:] |= out[:-1, :-1]
        grown[:-1, :-1] |= out[1:, 1:]
        grown[1:, :-1] |= out[:-1, 1:]
        grown[:-1, 1:] |= out[1:, :-1]
        out = grown
    return out


def far_from_segments(
    shape: tuple[int, int], transform: ImageToCanvas, segments: np.ndarray, margin: int
) -> np.ndarray:
    """Screen pixels (of a `shape` canvas) more than `margin` image pixels from any
    segmented pixel; outside the image counts as far."""
    near = dilate(segments, margin)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    xy = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
    rc = np.rint(transform.to_image(xy)).astype(int)
    rows, columns = segments.shape
    inside = (rc[:, 0] >= 0) & (rc[:, 0] < rows) & (rc[:, 1] >= 0) & (rc[:, 1] < columns)
    far = np.ones(len(xy), dtype=bool)
    far[inside] = ~near[rc[inside, 0], rc[inside, 1]]
    return far.reshape(shape)


@dataclass(frozen=True)
class OverlayCheck:
    lesion_pixels: int  # the SEG's lesion pixels that fall on the canvas
    coloured: float  # fraction of them that changed, towards the segment's colour
    far_changed: float  # fraction of far-from-segment screen pixels that changed

    @property
    def passes(self) -> bool:
        return self.lesion_pixels > 0 and self.coloured >= 0.9 and self.far_changed < 0.01


def check_overlay(
    shown: np.ndarray,
    hidden: np.ndarray,
    lesion_xy: np.ndarray,
    far: np.ndarray,
    colour: tuple[int, int, int],
) -> OverlayCheck:
    """Compare two (H, W, 3) screenshots at the lesion pixels' canvas points and far away."""
    a = shown[..., :3].astype(float)
    b = hidden[..., :3].astype(float)
    h, w = far.shape
    xy = np.floor(lesion_xy).astype(int)
    on = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    xs, ys = xy[on, 0], xy[on, 1]
    change = a[ys, xs] - b[ys, xs]
    towards = np.asarray(colour, dtype=float)[None, :] - b[ys, xs]
    moved = np.abs(change).max(axis=1) > CHANGE_LEVEL
    norms = np.linalg.norm(change, axis=1) * np.linalg.norm(towards, axis=1)
    cosine = (change * towards).sum(axis=1) / np.maximum(norms, 1e-9)
    coloured = moved & (cosine >= MIN_COSINE)
    far_moved = np.abs(a - b).max(axis=2) > CHANGE_LEVEL
    return OverlayCheck(
        lesion_pixels=int(on.sum()),
        coloured=float(coloured.mean()) if on.any() else 0.0,
        far_changed=float(far_moved[far].mean()) if far.any() else 1.0,
    )


def agreement(
    screen: np.ndarray, transform: ImageToCanvas, expected: np.ndarray, inside: np.ndarray
) -> float:
    """Pearson correlation between the screen's grey levels at the image's pixel centres
    and `expected` (the image as it should look, grey levels of any scale) over `inside`
    pixels: near 1 only when the viewer draws this very image there."""
    rows, columns = np.nonzero(inside)
    xy = np.floor(transform.to_canvas(rows.astype(float), columns.astype(float))).astype(int)
    h, w = screen.shape[:2]
    on = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    grey = screen[xy[on, 1], xy[on, 0], :3].astype(float).mean(axis=1)
    return float(np.corrcoef(grey, expected[rows[on], columns[on]].astype(float))[0, 1])


def windowed(hu: np.ndarray, voi: tuple[float, float]) -> np.ndarray:
    """A CT slice as the viewer's window (lower, upper) draws it, 0..1."""
    lower, upper = voi
    return np.clip((hu - lower) / (upper - lower), 0.0, 1.0)
