"""Data sets in the folder formats of ../shared/data, loaded once into memory.

Every sample is one axial slice on the network grid with whichever labels it has:

* UCSD COVID-CT (``covid_ct``): class folders ``CT_COVID/``, ``CT_NonCOVID/`` and the official
  split lists ``split/{train,val,test}CT_{COVID,NonCOVID}.txt``. Class label, no mask.
* MedSeg slices (``medseg_png``): ``images/*.png`` and binary ``masks/*.png`` with the same
  names. Lesion mask; every MedSeg slice comes from a COVID-19 patient, so class label 1.
* MedSeg volumes (``medseg_nifti``): the data set's original form, an image volume and a
  mask volume (NIfTI, read with SimpleITK, reoriented to LPS so that rows and columns run
  as in a DICOM axial image). Mask labels > 0 (ground glass, consolidation, effusion) are
  merged into one lesion mask. Intensities in HU are put through the checkpoint's lung
  window; volumes already in 0..255 are divided by 255.
* PNG stacks (``png_stack``): a folder whose subfolders (patients) each hold one ordered
  stack of 8-bit lung-window slices (``luna16-3/patient_N/z_NNN.png``), real CT in the
  same window and scaling as MedSeg. No mask; the class label comes from the config
  (``covid_label``; LUNA16 screening CT is non-COVID). Split by patient, never by slice.
* DICOM series + SEG (``dicom_seg``): a folder whose subfolders each hold one CT series
  and one or more DICOM SEG files that reference it (a series a radiologist corrected).
  SEG frames are mapped onto CT slices by ReferencedSOPInstanceUID; CT slices the SEG has
  no frame for count as lesion-free (highdicom omits empty frames). A class label only if
  the config gives one.

How 2-D images become network input (``read_gray_image``): palette/RGB images are made
grey with the ITU-R 601-2 luma transform (PIL ``convert("L")``), RGBA/LA images are first
composited onto black (transparent = outside the body = air), 16-bit and float images are
min-max scaled to 0..255. Coloured annotations in the UCSD figures (arrows, circles) thus
become grey marks; they are left in (their positions are not annotated). The whole image is
then resized to the square network grid with ``mtl_model.resize_slices`` (bilinear,
antialiased), without keeping the aspect ratio, as in the paper and the UCSD baselines.
Masks are resized bilinearly and thresholded at 0.5.

Case folders (``png_stack``, ``dicom_seg``) are chosen by name (``cases``) or, without
names, split like MedSeg slices over the sorted folder names. MedSeg fixed split: the 70
PNG slices sorted by file name; the slice at sorted position
``i`` is validation when ``i % val_every == val_offset`` (defaults 5 and 0: 14 validation,
56 training slices), else training. ``split = "all"`` takes every slice (held-back test
folders).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mtl_model import LUNG_WINDOW, HUWindow, hu_to_unit, resize_slices
from mtl_model.preprocessing import AIR_HU, crop_to_box, lung_box, unit_to_hu
from mtl_model.stacks import STACK_SPACING_MM, stack_files
from training.config import DatasetSpec

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LUNG_CODE = "39607008"


class DataError(ValueError):
    """A data folder that does not have the expected layout or content."""


@dataclass
class SliceSet:
    """Slices on the network grid with their labels (uint8 images and masks, in memory)."""

    images: torch.Tensor  # (N, 1, S, S) uint8
    masks: torch.Tensor  # (N, 1, S, S) uint8 0/1 (zeros where has_mask is False)
    has_mask: torch.Tensor  # (N,) bool
    labels: torch.Tensor  # (N,) float32 0/1 (0 where has_label is False)
    has_label: torch.Tensor  # (N,) bool
    names: list[str]
    source: str = ""
    # (N,) bool: may receive a transplanted lesion (DatasetSpec.lesion_recipient); empty
    # means none may
    recipient: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.recipient.numel() == 0:
            self.recipient = torch.zeros(n, dtype=torch.bool)
        for t in (self.masks, self.has_mask, self.labels, self.has_label, self.recipient):
            if t.shape[0] != n:
                raise ValueError("SliceSet tensors disagree on the number of slices")
        if len(self.names) != n:
            raise ValueError("SliceSet names disagree on the number of slices")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def summary(self) -> dict[str, object]:
        """Counts for logs, run folders and checkpoint metadata."""
        lab = self.has_label
        return {
            "source": self.source,
            "slices": len(self),
            "with_mask": int(self.has_mask.sum()),
            "with_label": int(lab.sum()),
            "covid": int((self.labels[lab] > 0.5).sum()),
            "non_covid": int((self.labels[lab] <= 0.5).sum()),
        }


def concat_slice_sets(sets: Sequence[SliceSet], source: str = "") -> SliceSet:
    if not sets:
        raise DataError("no data sets to concatenate")
    return SliceSet(
        images=torch.cat([s.images for s in sets]),
        masks=torch.cat([s.masks for s in sets]),
        has_mask=torch.cat([s.has_mask for s in sets]),
        labels=torch.cat([s.labels for s in sets]),
        has_label=torch.cat([s.has_label for s in sets]),
        names=[n for s in sets for n in s.names],
        source=source or "+".join(s.source for s in sets),
        recipient=torch.cat([s.recipient for s in sets]),
    )


class SliceDataset(Dataset[dict[str, torch.Tensor]]):
    """Map-style view of a SliceSet, optionally repeated; yields float tensors in [0, 1]."""

    def __init__(self, slices: SliceSet, repeat: int = 1) -> None:
        self.slices = slices
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.slices) * self.repeat

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = index % len(self.slices)
        s = self.slices
        return {
            "image": s.images[i].float().div_(255.0),
            "mask": s.masks[i].float(),
            "has_mask": s.has_mask[i],
            "label": s.labels[i],
            "has_label": s.has_label[i],
            "recipient": s.recipient[i],
            "index": torch.tensor(i),
        }


# ----------------------------------------------------------------------------- images


def read_gray_image(path: Path) -> np.ndarray:
    """Any PNG/JPG (grey, palette, RGB, RGBA, 16-bit) -> (H, W) uint8 grey."""
    try:
        with Image.open(path) as opened:
            opened.load()
            im: Image.Image = opened
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
                mode = im.mode
            if mode in ("RGBA", "LA", "PA"):
                rgba = im.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                im = Image.alpha_composite(black, rgba).convert("L")
            elif mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                lo, hi = float(a.min()), float(a.max())
                scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
                return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
            elif mode != "L":
                im = im.convert("L")
            arr = np.array(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"image {path} has unexpected shape {arr.shape}")
    return arr


def read_binary_mask(path: Path) -> np.ndarray:
    """A mask image (any mode) -> (H, W) bool, True where the lesion is."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from exc
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    return arr > 0


def to_grid_uint8(images: list[np.ndarray], size: int) -> torch.Tensor:
    """(H_i, W_i) uint8 images of any sizes -> (N, 1, size, size) uint8 via resize_slices."""
    out = torch.empty((len(images), 1, size, size), dtype=torch.uint8)
    for i, img in enumerate(images):
        t = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0)[None, None]
        r = resize_slices(t, size).clamp_(0.0, 1.0)
        out[i] = r[0].mul_(255.0).round_().to(torch.uint8)
    return out


def masks_to_grid(masks: list[np.ndarray], size: int) -> torch.Tensor:
    """(H_i, W_i) bool masks -> (N, 1, size, size) uint8 0/1 (bilinear, threshold 0.5)."""
    out = torch.empty((len(masks), 1, size, size), dtype=torch.uint8)
    for i, m in enumerate(masks):
        t = torch.from_numpy(np.ascontiguousarray(m)).float()[None, None]
        out[i] = (resize_slices(t, size)[0] >= 0.5).to(torch.uint8)
    return out


def unit_to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


#: voxel spacing given to the lung mask of a single slice (MedSeg), which counts as a 10 mm
#: slab so that the mask's volume limits (written for whole series) keep both its lungs;
#: a stack gets ``mtl_model.stacks.STACK_SPACING_MM``
SLICE_SPACING_MM = (10.0, 0.7, 0.7)


#: a real-CT folder (MedSeg PNG, PNG stacks) whose slices ``scripts/pack_data.py --cut``
#: already cut to their lung box from the full-resolution source, as :func:`cut_to_lung_box`
#: does at load; a lung-box run reads it as it is, any other run refuses it
LUNG_BOX_MARKER = "LUNG_BOX_CUT"


def cut_to_lung_box(
    images: list[np.ndarray],
    masks: list[np.ndarray] | None = None,
    spacing: tuple[float, float, float] = STACK_SPACING_MM,
    window: HUWindow = LUNG_WINDOW,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """One stack of 8-bit lung-window slices (and its masks) cut to the stack's lung box.

    The box is the node's (``mtl_model.preprocessing.lung_box`` of the HU lung mask), so a
    classifier trained on these crops sees what the Predictor gives it; a stack in which
    the mask finds no lung stays whole.
    """
    from mtl_model.lung import lung_mask  # SimpleITK, needed only where a box is cut

    stack = np.stack(images).astype(np.float32) / 255.0
    box = lung_box(lung_mask(unit_to_hu(stack, window), spacing))
    if box is None:
        logger.warning("no lung found in a stack of %d slices; it stays whole", len(images))
        return images, masks
    air = float(hu_to_unit(torch.tensor(AIR_HU), window)) * 255.0
    cut = crop_to_box(torch.from_numpy(np.stack(images)).float(), box, air)
    out = [unit_to_uint8(c / 255.0) for c in cut.numpy()]
    if masks is None:
        return out, None
    cut_masks = crop_to_box(torch.from_numpy(np.stack(masks)), box, False)
    return out, list(cut_masks.numpy())


# ----------------------------------------------------------------------------- UCSD


CLASS_FOLDERS = (("CT_COVID", "COVID", 1.0), ("CT_NonCOVID", "NonCOVID", 0.0))


def covid_ct_files(root: Path, split: str) -> list[tuple[Path, float]]:
    """(file, label) pairs of the UCSD COVID-CT split lists (or all files for ``all``)."""
    root = Path(root)
    items: list[tuple[Path, float]] = []
    for folder, tag, label in CLASS_FOLDERS:
        cdir = root / folder
        if not cdir.is_dir():
            raise DataError(f"UCSD COVID-CT folder {root} has no {folder}/")
        if split == "all":
            names = sorted(p.name for p in cdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            lst = root / "split" / f"{split}CT_{tag}.txt"
            if not lst.is_file():
                raise DataError(f"UCSD COVID-CT split list {lst} not found")
            names = [
                ln.strip() for ln in lst.read_text(encoding="utf-8").splitlines() if ln.strip()
            ]
        missing = [n for n in names if not (cdir / n).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} files of the {split} list for {folder} are missing, "
                f"e.g. {missing[:3]}"
            )
        items += [(cdir / n, label) for n in names]
    if not items:
        raise DataError(f"UCSD COVID-CT split {split!r} in {root} is empty")
    return items


def load_covid_ct(root: Path, split: str, size: int) -> SliceSet:
    items = covid_ct_files(root, split)
    images = [read_gray_image(p) for p, _ in items]
    n = len(items)
    return SliceSet(
        images=to_grid_uint8(images, size),
        masks=torch.zeros((n, 1, size, size), dtype=torch.uint8),
        has_mask=torch.zeros(n, dtype=torch.bool),
        labels=torch.tensor([lab for _, lab in items], dtype=torch.float32),
        has_label=torch.ones(n, dtype=torch.bool),
        names=[f"{p.parent.name}/{p.name}" for p, _ in items],
        source=f"covid_ct:{split}",
    )


# ----------------------------------------------------------------------------- MedSeg


def split_indices(n: int, split: str, val_every: int = 5, val_offset: int = 0) -> list[int]:
    """The fixed MedSeg split over ``n`` sorted items."""
    if split == "all":
        return list(range(n))
    if split == "val":
        return [i for i in range(n) if i % val_every == val_offset % val_every]
    if split == "train":
        return [i for i in range(n) if i % val_every != val_offset % val_every]
    raise DataError(
        f"MedSeg has no {split!r} portion here (held back); use split 'all' on a test folder"
    )


def medseg_png_pairs(
    root: Path, split: str, val_every: int = 5, val_offset: int = 0
) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a MedSeg slice folder in the chosen portion."""
    root = Path(root)
    idir, mdir = root / "images", root / "masks"
    if not idir.is_dir() or not mdir.is_dir():
        raise DataError(f"MedSeg folder {root} needs images/ and masks/")
    names = sorted(p.name for p in idir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise DataError(f"MedSeg folder {idir} has no images")
    missing = [n for n in names if not (mdir / n).is_file()]
    if missing:
        raise DataError(f"{len(missing)} MedSeg images have no mask, e.g. {missing[:3]}")
    return [
        (idir / names[i], mdir / names[i])
        for i in split_indices(len(names), split, val_every, val_offset)
    ]


def load_medseg_png(
    root: Path,
    split: str,
    size: int,
    val_every: int = 5,
    val_offset: int = 0,
    cut: bool = False,
) -> SliceSet:
    pairs = medseg_png_pairs(root, split, val_every, val_offset)
    images = [read_gray_image(i) for i, _ in pairs]
    masks = [read_binary_mask(m) for _, m in pairs]
    for (ip, _), img, m in zip(pairs, images, masks, strict=True):
        if img.shape != m.shape:
            raise DataError(f"MedSeg {ip.name}: image {img.shape} and mask {m.shape} differ")
    if cut:  # every MedSeg slice is a stack of its own, cut to its lung box
        for k in range(len(images)):
            one, one_mask = cut_to_lung_box([images[k]], [masks[k]], SLICE_SPACING_MM)
            assert one_mask is not None
            images[k], masks[k] = one[0], one_mask[0]
    n = len(pairs)
    return SliceSet(
        images=to_grid_uint8(images, size),
        masks=masks_to_grid(masks, size),
        has_mask=torch.ones(n, dtype=torch.bool),
        labels=torch.ones(n, dtype=torch.float32),
        has_label=torch.ones(n, dtype=torch.bool),
        names=[i.name for i, _ in pairs],
        source=f"medseg_png:{split}",
    )


def find_nifti_pair(path: Path) -> tuple[Path, Path]:
    """A folder with one image and one mask volume (name contains 'mask')."""
    path = Path(path)
    files = sorted(
        p for p in path.iterdir() if p.name.endswith((".nii", ".nii.gz")) and p.is_file()
    )
    masks = [p for p in files if "mask" in p.name.lower()]
    images = [p for p in files if "mask" not in p.name.lower()]
    if len(masks) != 1 or len(images) != 1:
        raise DataError(
            f"NIfTI MedSeg folder {path} needs exactly one image and one mask volume "
            f"(mask file name contains 'mask'); found images {[p.name for p in images]}, "
            f"masks {[p.name for p in masks]}"
        )
    return images[0], masks[0]


def read_nifti_volumes(
    image_path: Path, mask_path: Path, window: HUWindow = LUNG_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """(Z, Y, X) float32 in [0, 1] and (Z, Y, X) bool lesion mask, LPS-oriented."""
    import SimpleITK as sitk

    try:
        img = sitk.DICOMOrient(sitk.ReadImage(str(image_path)), "LPS")
        msk = sitk.DICOMOrient(sitk.ReadImage(str(mask_path)), "LPS")
    except RuntimeError as exc:
        raise DataError(f"cannot read NIfTI pair {image_path}, {mask_path}: {exc}") from exc
    vol = sitk.GetArrayFromImage(img).astype(np.float32)
    mask = sitk.GetArrayFromImage(msk)
    if vol.ndim != 3 or vol.shape != mask.shape:
        raise DataError(
            f"NIfTI image {image_path.name} {vol.shape} and mask {mask_path.name} "
            f"{mask.shape} must be 3-D volumes of the same shape"
        )
    if float(vol.min()) >= 0.0 and float(vol.max()) <= 255.0:
        unit = vol / 255.0  # already windowed 8-bit values
    else:
        unit = hu_to_unit(torch.from_numpy(vol), window).numpy()
    return unit.astype(np.float32), mask > 0


def load_medseg_nifti(
    root: Path,
    split: str,
    size: int,
    val_every: int = 5,
    val_offset: int = 0,
    window: HUWindow = LUNG_WINDOW,
) -> SliceSet:
    image_path, mask_path = find_nifti_pair(root)
    vol, mask = read_nifti_volumes(image_path, mask_path, window)
    idx = split_indices(vol.shape[0], split, val_every, val_offset)
    n = len(idx)
    return SliceSet(
        images=to_grid_uint8([unit_to_uint8(vol[i]) for i in idx], size),
        masks=masks_to_grid([mask[i] for i in idx], size),
        has_mask=torch.ones(n, dtype=torch.bool),
        labels=torch.ones(n, dtype=torch.float32),
        has_label=torch.ones(n, dtype=torch.bool),
        names=[f"{image_path.name}#{i}" for i in idx],
        source=f"medseg_nifti:{split}",
    )


# ----------------------------------------------------------------------------- DICOM + SEG


@dataclass
class DicomSegCase:
    """One CT series (sorted along the slice normal) with its merged lesion masks."""

    folder: Path
    series_instance_uid: str
    hu: np.ndarray  # (Z, Y, X) float32
    lesion: np.ndarray  # (Z, Y, X) bool
    sop_instance_uids: list[str] = field(default_factory=list)


def _hu_from_dataset(ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_rescale

    arr = ds.pixel_array
    return np.asarray(apply_rescale(arr, ds), dtype=np.float32)


def read_dicom_seg_case(folder: Path, segment_labels: Sequence[str] = ()) -> DicomSegCase:
    """Read one subfolder: its CT series and the SEG files that reference it."""
    import highdicom as hd
    import pydicom
    from pydicom.errors import InvalidDicomError

    ct: list[pydicom.Dataset] = []
    seg_paths: list[Path] = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        modality = str(ds.get("Modality", ""))
        if modality == "SEG":
            seg_paths.append(p)
        elif "Rows" in ds and modality in ("CT", "MR", "PT", "OT", ""):
            ct.append(pydicom.dcmread(p))
    if not ct:
        raise DataError(f"{folder}: no CT images found")
    if not seg_paths:
        raise DataError(f"{folder}: no DICOM SEG file found")
    series_uids = {str(d.SeriesInstanceUID) for d in ct}
    if len(series_uids) != 1:
        raise DataError(f"{folder}: expected one CT series, found {len(series_uids)}")
    series_uid = series_uids.pop()

    def position(d: pydicom.Dataset) -> float:
        ipp = d.get("ImagePositionPatient")
        iop = d.get("ImageOrientationPatient")
        if ipp is None or iop is None:
            return float(d.get("InstanceNumber", 0) or 0)
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        return float(np.dot(normal, np.asarray(ipp, float)))

    ct.sort(key=position)
    shape = (int(ct[0].Rows), int(ct[0].Columns))
    if any((int(d.Rows), int(d.Columns)) != shape for d in ct):
        raise DataError(f"{folder}: CT slices differ in size")
    hu = np.stack([_hu_from_dataset(d) for d in ct])
    sops = [str(d.SOPInstanceUID) for d in ct]
    index = {uid: i for i, uid in enumerate(sops)}
    lesion = np.zeros(hu.shape, dtype=bool)
    used = 0
    for sp in seg_paths:
        seg = hd.seg.segread(sp)
        refs = {str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])}
        if series_uid not in refs:
            logger.warning(
                "%s: SEG %s does not reference series %s; skipped", folder, sp, series_uid
            )
            continue
        numbers = _lesion_segments(seg, segment_labels)
        if not numbers:
            logger.warning("%s: SEG %s has no lesion segment; skipped", folder, sp.name)
            continue
        referenced = [str(sop) for _, _, sop in seg.get_source_image_uids()]
        covered = [uid for uid in dict.fromkeys(referenced) if uid in index]
        if not covered:
            raise DataError(f"{folder}: SEG {sp.name} references none of the series' slices")
        px = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=covered,
            segment_numbers=numbers,
            combine_segments=False,
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )
        if px.shape[1:3] != shape:
            raise DataError(f"{folder}: SEG {sp.name} frames {px.shape[1:3]} != CT {shape}")
        merged = px.reshape(px.shape[0], shape[0], shape[1], -1).max(axis=-1) > 0
        for k, uid in enumerate(covered):
            lesion[index[uid]] |= merged[k]
        used += 1
    if not used:
        raise DataError(f"{folder}: no usable SEG references the CT series {series_uid}")
    return DicomSegCase(folder, series_uid, hu, lesion, sops)


def _lesion_segments(seg: object, segment_labels: Sequence[str]) -> list[int]:
    out: list[int] = []
    for desc in seg.SegmentSequence:  # type: ignore[attr-defined]
        label = str(desc.get("SegmentLabel", ""))
        codes = [str(c.CodeValue) for c in desc.get("SegmentedPropertyTypeCodeSequence", [])]
        if segment_labels:
            if label in segment_labels:
                out.append(int(desc.SegmentNumber))
        elif LUNG_CODE not in codes and label.lower() != "lung":
            out.append(int(desc.SegmentNumber))
    return out


def case_folders(
    root: Path,
    split: str,
    cases: Sequence[str] = (),
    val_every: int = 5,
    val_offset: int = 0,
    what: str = "DICOM SEG",
) -> list[Path]:
    """The chosen case subfolders of a data folder: by name, else by the fixed split."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what} data folder {root} not found")
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    if not subs:
        raise DataError(f"{what} data folder {root} has no case subfolders")
    if cases:
        by_name = {p.name: p for p in subs}
        unknown = [c for c in cases if c not in by_name]
        if unknown:
            raise DataError(
                f"{what} data folder {root} has no case(s) {unknown}; it has {sorted(by_name)}"
            )
        return [by_name[c] for c in cases]
    return [subs[i] for i in split_indices(len(subs), split, val_every, val_offset)]


def load_dicom_seg(
    root: Path,
    split: str,
    size: int,
    covid_label: bool | None = None,
    segment_labels: Sequence[str] = (),
    window: HUWindow = LUNG_WINDOW,
    val_every: int = 5,
    val_offset: int = 0,
    cases: Sequence[str] = (),
) -> SliceSet:
    """All slices of every chosen case (see :func:`case_folders`)."""
    chosen = case_folders(root, split, cases, val_every, val_offset)
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    names: list[str] = []
    for folder in chosen:
        case = read_dicom_seg_case(folder, segment_labels)
        unit = hu_to_unit(torch.from_numpy(case.hu), window).numpy()
        for z in range(unit.shape[0]):
            images.append(unit_to_uint8(unit[z]))
            masks.append(case.lesion[z])
            names.append(f"{folder.name}/{case.sop_instance_uids[z]}")
    n = len(images)
    if n == 0:
        raise DataError(f"DICOM SEG data {root}: the {split!r} portion has no cases")
    return SliceSet(
        images=to_grid_uint8(images, size),
        masks=masks_to_grid(masks, size),
        has_mask=torch.ones(n, dtype=torch.bool),
        labels=torch.full((n,), float(bool(covid_label)), dtype=torch.float32),
        has_label=torch.full((n,), covid_label is not None, dtype=torch.bool),
        names=names,
        source=f"dicom_seg:{split}",
    )


# ----------------------------------------------------------------------------- PNG stacks


def stack_slices(folder: Path) -> list[Path]:
    """The PNG slices of one stack in slice order (``mtl_model.stacks.stack_files``)."""
    files = stack_files(folder)
    if not files:
        raise DataError(f"PNG stack {folder} has no PNG slices")
    return files


def load_png_stacks(
    root: Path,
    split: str,
    size: int,
    covid_label: bool,
    cases: Sequence[str] = (),
    val_every: int = 5,
    val_offset: int = 0,
    cut: bool = False,
) -> SliceSet:
    """Every slice of the chosen patients' stacks, labelled ``covid_label``; with
    ``cut`` each stack cut to its lung box (:func:`cut_to_lung_box`)."""
    chosen = case_folders(root, split, cases, val_every, val_offset, what="PNG stack")
    if not chosen:
        raise DataError(f"PNG stacks {root}: the {split!r} portion has no patients")
    paths: list[tuple[Path, Path]] = []
    images: list[np.ndarray] = []
    for folder in chosen:
        files = stack_slices(folder)
        stack = [read_gray_image(f) for f in files]
        if len({a.shape for a in stack}) > 1:
            raise DataError(f"PNG stack {folder}: slices differ in size")
        if cut:
            stack, _ = cut_to_lung_box(stack)
        paths += [(folder, f) for f in files]
        images += stack
    n = len(paths)
    return SliceSet(
        images=to_grid_uint8(images, size),
        masks=torch.zeros((n, 1, size, size), dtype=torch.uint8),
        has_mask=torch.zeros(n, dtype=torch.bool),
        labels=torch.full((n,), float(covid_label), dtype=torch.float32),
        has_label=torch.ones(n, dtype=torch.bool),
        names=[f"{folder.name}/{f.name}" for folder, f in paths],
        source="png_stack:" + ",".join(p.name for p in chosen),
    )


def load_spec(spec: DatasetSpec, data_root: Path, size: int, cut: bool = False) -> SliceSet:
    """Load one configured data set onto a ``size`` x ``size`` grid.

    ``cut`` cuts real CT (MedSeg PNG slices, PNG stacks) to its lung box; UCSD figures
    stay whole; for MedSeg NIfTI and DICOM+SEG sets (lesion training) it is refused.
    """
    path = spec.resolve(data_root)
    if not path.exists():
        raise DataError(f"data set {spec.kind} not found at {path} (data root {data_root})")
    if cut and spec.kind in ("medseg_nifti", "dicom_seg"):
        raise DataError(f"lung-box classifier input is not implemented for {spec.kind} data")
    if (path / LUNG_BOX_MARKER).is_file():
        if not cut:
            raise DataError(
                f"{path} was cut to its lung box ({LUNG_BOX_MARKER}, scripts/pack_data.py "
                "--cut): only a lung-box classifier (classifier_input = 'lung_box') reads it"
            )
        logger.info("%s is already cut to its lung box (%s)", path, LUNG_BOX_MARKER)
        cut = False
    if spec.kind == "covid_ct":
        s = load_covid_ct(path, spec.split, size)
    elif spec.kind == "medseg_png":
        s = load_medseg_png(path, spec.split, size, spec.val_every, spec.val_offset, cut)
    elif spec.kind == "medseg_nifti":
        s = load_medseg_nifti(path, spec.split, size, spec.val_every, spec.val_offset)
    elif spec.kind == "png_stack":
        assert spec.covid_label is not None  # DatasetSpec requires it
        s = load_png_stacks(
            path,
            spec.split,
            size,
            spec.covid_label,
            spec.cases,
            spec.val_every,
            spec.val_offset,
            cut,
        )
    else:
        s = load_dicom_seg(
            path,
            spec.split,
            size,
            spec.covid_label,
            spec.segment_labels,
            val_every=spec.val_every,
            val_offset=spec.val_offset,
            cases=spec.cases,
        )
    if not spec.use_class_label:
        s.has_label = torch.zeros_like(s.has_label)
        s.labels = torch.zeros_like(s.labels)
    if spec.lesion_recipient:
        s.recipient = torch.ones(len(s), dtype=torch.bool)
    logger.info("loaded %s from %s: %s", spec.kind, path, s.summary())
    return s
