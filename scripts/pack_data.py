"""Pack the training data onto the 256 x 256 network grid for a device call (64 MiB limit).

Writes the layout of ../shared/data (``covid-ct/`` with its split lists, ``medseg-100/``,
``luna16-3/``) with every image already made grey and resized exactly as training does it
(``training.data.read_gray_image`` + ``to_grid_uint8``; masks ``masks_to_grid``), so a run at
``input_size = 256`` on the pack sees the same uint8 slices as on the original folders
(resizing a 256 image to 256 is a no-op). About 35 MB instead of 130 MB.

    python scripts/pack_data.py --out .gpu/data   # then carry .gpu on the device

``--cut`` also writes the real CT cut to its lung box for a lung-box classifier
(``classifier_input = "lung_box"``): ``medseg-100-box/`` and ``luna16-3-box/``, each cut from
the full-resolution source exactly as training cuts it at load
(``training.data.cut_to_lung_box``, then the grid), and marked ``LUNG_BOX_CUT`` so that
loading does not cut again. Cutting the 256 pack instead would blow a box of about 200
pixels up to 256: blurrier than what the node's Predictor cuts from the 512 source.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from training.config import default_data_root
from training.data import (
    CLASS_FOLDERS,
    LUNG_BOX_MARKER,
    SLICE_SPACING_MM,
    covid_ct_files,
    cut_to_lung_box,
    masks_to_grid,
    read_binary_mask,
    read_gray_image,
    stack_slices,
    to_grid_uint8,
)


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")  # PIL reads by content, whatever the suffix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_root())
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cut", action="store_true", help="also the lung-box cut of real CT")
    args = ap.parse_args()
    src, out, size = args.data, args.out, args.size
    if out.exists():
        shutil.rmtree(out)
    (out / "covid-ct" / "split").mkdir(parents=True)
    for lst in (src / "covid-ct" / "split").glob("*.txt"):
        shutil.copy(lst, out / "covid-ct" / "split" / lst.name)
    for split in ("train", "val"):
        for path, _ in covid_ct_files(src / "covid-ct", split):
            grid = to_grid_uint8([read_gray_image(path)], size)[0, 0].numpy()
            _save(grid, out / "covid-ct" / path.parent.name / path.name)
    for folder, _tag, _label in CLASS_FOLDERS:
        (out / "covid-ct" / folder).mkdir(exist_ok=True)
    for img in sorted((src / "medseg-100" / "images").glob("*.png")):
        grid = to_grid_uint8([read_gray_image(img)], size)[0, 0].numpy()
        mask = masks_to_grid([read_binary_mask(src / "medseg-100" / "masks" / img.name)], size)
        _save(grid, out / "medseg-100" / "images" / img.name)
        _save(mask[0, 0].numpy() * 255, out / "medseg-100" / "masks" / img.name)
    for patient in sorted(p for p in (src / "luna16-3").iterdir() if p.is_dir()):
        for f in stack_slices(patient):
            grid = to_grid_uint8([read_gray_image(f)], size)[0, 0].numpy()
            _save(grid, out / "luna16-3" / patient.name / f.name)
    if args.cut:
        box = out / "medseg-100-box"
        for img in sorted((src / "medseg-100" / "images").glob("*.png")):
            mask = read_binary_mask(src / "medseg-100" / "masks" / img.name)
            one, one_mask = cut_to_lung_box([read_gray_image(img)], [mask], SLICE_SPACING_MM)
            assert one_mask is not None
            _save(to_grid_uint8(one, size)[0, 0].numpy(), box / "images" / img.name)
            _save(masks_to_grid(one_mask, size)[0, 0].numpy() * 255, box / "masks" / img.name)
        box = out / "luna16-3-box"
        for patient in sorted(p for p in (src / "luna16-3").iterdir() if p.is_dir()):
            files = stack_slices(patient)
            cut, _ = cut_to_lung_box([read_gray_image(f) for f in files])
            for f, grid in zip(files, to_grid_uint8(cut, size)[:, 0].numpy(), strict=True):
                _save(grid, box / patient.name / f.name)
        for box in (out / "medseg-100-box", out / "luna16-3-box"):
            (box / LUNG_BOX_MARKER).write_text("cut by scripts/pack_data.py --cut\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"packed {src} onto {size}x{size} in {out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
