"""Real slices to calibrate the int8 OpenVINO engine on (NNCF post-training quantisation).

Post-training quantisation picks each activation's int8 range from what the network sees
on a few representative inputs, so those inputs are real slices passed through the
Predictor's own preprocessing (window, lung box, resize), never random images. The
default set, :func:`calibration_source` on the data root (env ``CTMTL_CALIBRATION``, else
``CTMTL_DATA`` / ``../shared/data``), is 32 slices from portions of the shared data that
the model card's figures are *not* measured on:

* 12 MedSeg slices of the training portion (sorted names, every 5th is validation, as in
  ``training.data.split_indices``), COVID-19 lesions, each its own lung box;
* 12 slices of LUNA16 patient 1 (``luna16-3/patient_1``, screening CT, normal lungs),
  evenly spaced over the stack, the stack's lung box;
* 8 UCSD COVID-CT figures of the official *train* split (4 COVID, 4 non-COVID), whole
  (the classifier sees UCSD figures whole, as ``ctmtl-train evaluate`` gives them).

Not used: UCSD val, MedSeg val, LUNA16 patients 2 and 3, and the two DICOM series
(RICORD, Lung-PET-CT-Dx), which the model card and ``benchmarks/predictor.py --compare``
report on. A site without the shared data points ``calibration`` (or env
``CTMTL_CALIBRATION``) at a folder of its own 8-bit lung-window PNG stacks (one folder of
slices, or one subfolder per series); 32 slices are taken evenly from them.

Only the file list is read to key the engine cache (:attr:`CalibrationSource.ident`); the
pixels and lung masks are loaded when an int8 engine is actually built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mtl_model.lung import lung_mask
from mtl_model.preprocessing import LUNG_WINDOW, unit_to_hu
from mtl_model.stacks import STACK_SPACING_MM, default_data_root, stack_files

logger = logging.getLogger(__name__)

CALIBRATION_SLICES = 32
#: voxel spacing (z, y, x) mm given to the lung mask of a single slice: a 10 mm slab, as
#: training cuts MedSeg slices (``training.data.SLICE_SPACING_MM``)
SLICE_SPACING_MM = (10.0, 0.7, 0.7)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class CalibrationError(RuntimeError):
    """No usable calibration slices where they were looked for."""


@dataclass
class CalibrationGroup:
    """Calibration files and how their lung box is found."""

    name: str
    files: list[Path]
    #: "stack": one lung box over all files; "slices": one box per file; "whole": no box
    box: str
    spacing_mm: tuple[float, float, float] = STACK_SPACING_MM


@dataclass
class CalibrationSeries:
    """Loaded slices in [0, 1] and their lung mask (None: the classifier sees them whole)."""

    name: str
    images: np.ndarray
    lung: np.ndarray | None


@dataclass
class CalibrationSource:
    """Where the calibration slices come from; loads them on demand."""

    root: Path
    groups: list[CalibrationGroup] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return sum(len(g.files) for g in self.groups)

    @property
    def ident(self) -> str:
        """A digest of the file list (names relative to ``root``, sizes): the cache key part."""
        items = []
        for g in self.groups:
            for f in g.files:
                try:
                    rel = f.relative_to(self.root).as_posix()
                except ValueError:
                    rel = f.as_posix()
                items.append([g.name, g.box, rel, f.stat().st_size])
        blob = json.dumps(items, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> str:
        parts = ", ".join(f"{g.name} ({len(g.files)})" for g in self.groups)
        return f"{self.n_slices} slices under {self.root}: {parts}"

    def load(self) -> list[CalibrationSeries]:
        """The slices in [0, 1], with the lung masks their lung boxes come from."""
        out: list[CalibrationSeries] = []
        for g in self.groups:
            images = [read_unit_image(f) for f in g.files]
            if g.box == "slices":
                for f, img in zip(g.files, images, strict=True):
                    out.append(CalibrationSeries(f.name, img[None], _lung(img[None], g)))
            elif g.box == "stack":
                shapes = {img.shape for img in images}
                if len(shapes) != 1:
                    raise CalibrationError(f"calibration stack {g.name}: slice sizes {shapes}")
                stack = np.stack(images)
                out.append(CalibrationSeries(g.name, stack, _lung(stack, g)))
            else:
                out.extend(
                    CalibrationSeries(f.name, img[None], None)
                    for f, img in zip(g.files, images, strict=True)
                )
        return out


def _lung(stack: np.ndarray, group: CalibrationGroup) -> np.ndarray:
    return lung_mask(unit_to_hu(stack, LUNG_WINDOW), group.spacing_mm)


def read_unit_image(path: Path) -> np.ndarray:
    """An 8-bit (or 16-bit) image file -> (H, W) float32 grey in [0, 1]."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                lo, hi = float(a.min()), float(a.max())
                return ((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)).astype(np.float32)
            if im.mode in ("RGBA", "LA", "PA", "P"):
                rgba = im.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                grey = Image.alpha_composite(black, rgba).convert("L")
            else:
                grey = im.convert("L")
            return np.asarray(grey, dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read calibration image {path}: {exc}") from exc


def _even(items: list[Path], n: int) -> list[Path]:
    if n >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _shared_data_groups(root: Path, n: int) -> list[CalibrationGroup]:
    """The default set (module docstring) from the shared data layout."""
    groups: list[CalibrationGroup] = []
    n_ucsd = n // 4
    n_ct = n - n_ucsd
    medseg = root / "medseg-100" / "images"
    luna = root / "luna16-3" / "patient_1"
    have_medseg, have_luna = medseg.is_dir(), luna.is_dir()
    n_medseg = n_ct // 2 if have_luna else n_ct
    if have_medseg:
        names = _images(medseg)
        train = [f for i, f in enumerate(names) if i % 5 != 0]  # every 5th is validation
        groups.append(
            CalibrationGroup("medseg-train", _even(train, n_medseg), "slices", SLICE_SPACING_MM)
        )
    if have_luna:
        files = stack_files(luna)
        groups.append(CalibrationGroup("luna16-patient_1", _even(files, n_ct - n_medseg), "stack"))
    ucsd = root / "covid-ct"
    picked: list[Path] = []
    for folder, tag in (("CT_COVID", "COVID"), ("CT_NonCOVID", "NonCOVID")):
        lst = ucsd / "split" / f"trainCT_{tag}.txt"
        if lst.is_file():
            names_ = [ln.strip() for ln in lst.read_text(encoding="utf-8").splitlines()]
            files_ = [ucsd / folder / s for s in names_ if s and (ucsd / folder / s).is_file()]
            picked += _even(files_, n_ucsd // 2)
    if picked:
        groups.append(CalibrationGroup("ucsd-train", picked, "whole"))
    return [g for g in groups if g.files]


def calibration_source(
    path: str | Path | None = None, n: int = CALIBRATION_SLICES
) -> CalibrationSource:
    """The calibration slices at ``path`` (default: env ``CTMTL_CALIBRATION``, else the data
    root). A folder in the shared-data layout gives the default set; any other folder is
    read as 8-bit lung-window PNG stacks (its own images, or one stack per subfolder).
    Raises :class:`CalibrationError` when there are none."""
    if path is None:
        env = os.environ.get("CTMTL_CALIBRATION")
        path = Path(env) if env else default_data_root()
    root = Path(path)
    if not root.is_dir():
        raise CalibrationError(f"calibration folder {root} not found")
    if any((root / d).is_dir() for d in ("medseg-100", "luna16-3", "covid-ct")):
        groups = _shared_data_groups(root, n)
    else:
        stacks = [root] if stack_files(root) else [d for d in sorted(root.iterdir()) if d.is_dir()]
        groups = []
        for i, s in enumerate(stacks):
            share = n // len(stacks) + (1 if i < n % len(stacks) else 0)
            files = _even(stack_files(s), share)
            if files:
                groups.append(CalibrationGroup(s.name or str(s), files, "stack"))
    source = CalibrationSource(root, groups)
    if source.n_slices == 0:
        raise CalibrationError(
            f"no calibration slices in {root} (expected the shared data layout or folders "
            "of 8-bit lung-window PNG slices)"
        )
    return source
