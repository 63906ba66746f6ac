"""mtl_model.lung: a synthetic chest with known answers, and the real series."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from dicom_node.volume import load_series
from mtl_model.lung import lung_mask


def _ellipsoid(shape: tuple[int, int, int], centre, radii) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    ) <= 1.0


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Air around a soft-tissue body with two lungs, a dense lesion, a stomach bubble."""
    shape = (40, 128, 128)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    _, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - 64) / 56.0) ** 2 + ((x - 64) / 60.0) ** 2 <= 1.0
    hu[:, body[0]] = 40.0
    right = _ellipsoid(shape, (20, 62, 38), (17, 34, 18))
    left = _ellipsoid(shape, (20, 62, 90), (17, 34, 18))
    hu[right | left] = -850.0
    lesion = _ellipsoid(shape, (20, 62, 38), (4, 8, 8))  # consolidation inside the lung
    hu[lesion] = 30.0
    stomach = _ellipsoid(shape, (36, 100, 64), (3, 6, 6))  # small gas pocket elsewhere
    hu[stomach] = -950.0
    return hu, right | left, lesion


def test_phantom_lungs_found_with_enclosed_lesion_and_without_outside_air() -> None:
    hu, lungs, lesion = _phantom()
    spacing = (2.0, 1.5, 1.5)
    mask = lung_mask(hu, spacing, min_component_ml=1.0)
    assert mask.dtype == bool and mask.shape == hu.shape
    assert not mask[hu == -1000.0].any()  # outside air and its border never count
    assert mask[lesion].all()  # the dense lesion inside the lung is filled in
    stomach = hu == -950.0
    assert not mask[stomach].any()  # small separate gas pocket dropped
    expected = lungs.sum()
    assert abs(int(mask.sum()) - int(expected)) < 0.03 * expected


def test_phantom_without_lungs_gives_empty_mask() -> None:
    hu = np.full((10, 64, 64), -1000.0, dtype=np.float32)
    hu[:, 8:56, 8:56] = 20.0
    assert not lung_mask(hu, (1.0, 1.0, 1.0)).any()
    with pytest.raises(ValueError):
        lung_mask(hu[0], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        lung_mask(hu, (0.0, 1.0, 1.0))


def test_noncovid_lung_volume_is_plausible(noncovid_files: list[Path]) -> None:
    vol = load_series(noncovid_files)
    mask = lung_mask(vol.hu, vol.spacing)
    litres = mask.sum() * vol.voxel_volume_ml / 1000
    assert 2.0 < litres < 8.0
    # lungs are air-like: most voxels in the mask are below -500 HU
    assert np.median(vol.hu[mask]) < -700
    # and left/right both present: mask on both sides of the patient's midline
    mid = vol.shape[2] // 2
    assert mask[:, :, :mid].sum() > 0.3 * mask.sum()
    assert mask[:, :, mid:].sum() > 0.3 * mask.sum()


@pytest.mark.slow
def test_covid_lung_volume_is_plausible_and_fast(covid_files: list[Path]) -> None:
    vol = load_series(covid_files)
    t0 = time.perf_counter()
    mask = lung_mask(vol.hu, vol.spacing)
    elapsed = time.perf_counter() - t0
    litres = mask.sum() * vol.voxel_volume_ml / 1000
    assert 2.0 < litres < 8.0
    lung_slices = np.flatnonzero(mask.any(axis=(1, 2)))
    # the lungs span most of a chest CT, contiguously
    assert lung_slices.size > 0.6 * vol.shape[0]
    assert lung_slices[-1] - lung_slices[0] + 1 == lung_slices.size
    # ~5 s for 255x512x512 on one free core; the bound only catches pathological slowness
    # (the CI machine's 2 cores are shared)
    assert elapsed < 60.0
