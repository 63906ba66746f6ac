"""Where the real data lives, and the 8-bit PNG stack convention training and node share.

A PNG stack (``luna16-3/patient_N/z_NNN.png``) is one CT series as 8-bit slices in the lung
window: its slices in natural order of their file names (``z_2`` before ``z_10``), grey
values mapped back to HU by ``mtl_model.preprocessing.unit_to_hu``, and, since a PNG has
no geometry, :data:`STACK_SPACING_MM` for the lung mask unless told otherwise. Training
cuts such stacks to the lung box exactly as ``ctmtl-node evaluate`` scores them, so both
take this one definition.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
#: voxel spacing (z, y, x) mm of a PNG stack: a chest CT on a 512 matrix (0.7 mm pixels)
#: with every 2nd of 1.25 mm slices, as in luna16-3/; it changes the mL figures and the lung
#: mask's mm-based limits a little, neither the probabilities nor the percentages
STACK_SPACING_MM = (2.5, 0.7, 0.7)
STACK_SUFFIXES = (".png",)


def default_data_root() -> Path:
    """Env ``CTMTL_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("CTMTL_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def stack_files(folder: Path) -> list[Path]:
    """The PNG slices of one stack in slice order (empty when it has none)."""
    files = (
        p
        for p in Path(folder).iterdir()
        if p.is_file() and p.suffix.lower() in STACK_SUFFIXES and not p.name.startswith(".")
    )
    return sorted(files, key=_natural_key)
