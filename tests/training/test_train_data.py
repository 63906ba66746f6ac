"""Data set loaders against the real folders and small files the tests write."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import DatasetSpec
from training.data import (
    DataError,
    SliceDataset,
    concat_slice_sets,
    covid_ct_files,
    load_covid_ct,
    load_dicom_seg,
    load_medseg_nifti,
    load_medseg_png,
    load_spec,
    medseg_png_pairs,
    read_dicom_seg_case,
    read_gray_image,
)

# ----------------------------------------------------------------- UCSD COVID-CT


def test_covid_ct_official_split_counts(data_dir: Path) -> None:
    root = data_dir / "covid-ct"
    train = covid_ct_files(root, "train")
    val = covid_ct_files(root, "val")
    assert (len(train), len(val)) == (425, 118)
    assert sum(lab for _, lab in train) == 191 and sum(lab for _, lab in val) == 60
    assert not {p for p, _ in train} & {p for p, _ in val}
    with pytest.raises(DataError, match=r"testCT_COVID\.txt"):
        covid_ct_files(root, "test")  # held back by the product owner


def test_covid_ct_loader_on_real_images(mini_data: Path) -> None:
    s = load_covid_ct(mini_data / "covid-ct", "val", 64)
    assert s.images.shape == (8, 1, 64, 64) and s.images.dtype == torch.uint8
    assert s.labels.tolist() == [1.0] * 4 + [0.0] * 4
    assert bool(s.has_label.all()) and not bool(s.has_mask.any())
    assert int(s.masks.sum()) == 0
    # real CT content: not blank, spans a range of grey values
    for img in s.images:
        assert int(img.max()) - int(img.min()) > 100
    assert s.summary() == {
        "source": "covid_ct:val",
        "slices": 8,
        "with_mask": 0,
        "with_label": 8,
        "covid": 4,
        "non_covid": 4,
    }


def test_gray_conversion_of_rgb_rgba_and_16bit(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 200  # pure red annotation
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    # ITU-R 601-2 luma: 0.299 * 200
    assert read_gray_image(tmp_path / "rgb.png")[0, 0] == round(0.299 * 200)
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[0, 0, 3] = 0  # transparent pixel -> black (air)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    g = read_gray_image(tmp_path / "rgba.png")
    assert g[0, 0] == 0 and g[1, 1] == 255
    a16 = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    Image.fromarray(a16).save(tmp_path / "i16.png")
    g16 = read_gray_image(tmp_path / "i16.png")
    assert g16.dtype == np.uint8 and g16.min() == 0 and g16.max() == 255
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken\.png"):
        read_gray_image(tmp_path / "broken.png")


# ----------------------------------------------------------------- MedSeg


def test_medseg_fixed_split_on_real_folder(data_dir: Path) -> None:
    root = data_dir / "medseg-100"
    train = medseg_png_pairs(root, "train")
    val = medseg_png_pairs(root, "val")
    assert (len(train), len(val)) == (56, 14)
    names = sorted(p.name for p in (root / "images").iterdir())
    assert [i.name for i, _ in val] == names[::5]
    assert not {i for i, _ in train} & {i for i, _ in val}
    assert medseg_png_pairs(root, "val") == val  # deterministic
    with pytest.raises(DataError, match="held back"):
        medseg_png_pairs(root, "test")


def test_medseg_png_loader(mini_data: Path) -> None:
    s = load_medseg_png(mini_data / "medseg-100", "val", 64)
    assert len(s) == 3 and s.masks.shape == (3, 1, 64, 64)
    assert set(torch.unique(s.masks).tolist()) <= {0, 1}
    assert bool(s.has_mask.all()) and s.labels.tolist() == [1.0, 1.0, 1.0]
    assert all(int(m.sum()) > 0 for m in s.masks)  # every MedSeg slice has a lesion
    item = SliceDataset(s)[0]
    assert item["image"].dtype == torch.float32 and float(item["image"].max()) <= 1.0


def _write_nifti_pair(folder: Path, hu: bool) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    z, y, x = 10, 40, 48
    if hu:
        vol = np.full((z, y, x), -1000.0, np.float32)
        vol[:, 10:30, 8:20] = -600.0  # the lung window centre -> 0.5
    else:
        vol = np.full((z, y, x), 20.0, np.float32)
        vol[:, 10:30, 8:20] = 255.0
    mask = np.zeros((z, y, x), np.uint8)
    mask[0, 12:16, 10:14] = 1  # ground glass
    mask[5, 20:24, 10:14] = 2  # consolidation
    mask[7, 5:8, 30:40] = 3  # effusion
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.8, 0.8, 5.0))
    msk = sitk.GetImageFromArray(mask)
    msk.CopyInformation(img)
    sitk.WriteImage(img, str(folder / "tr_im.nii.gz"))
    sitk.WriteImage(msk, str(folder / "tr_mask.nii.gz"))
    return vol, mask


def test_medseg_nifti_pair(tmp_path: Path) -> None:
    _write_nifti_pair(tmp_path / "nii", hu=True)
    val = load_medseg_nifti(tmp_path / "nii", "val", 32)
    train = load_medseg_nifti(tmp_path / "nii", "train", 32)
    assert (len(val), len(train)) == (2, 8)  # slices 0 and 5 are validation
    assert val.names == ["tr_im.nii.gz#0", "tr_im.nii.gz#5"]
    assert all(int(m.sum()) > 0 for m in val.masks)  # labels 1 and 2 merged as lesion
    assert int(train.masks[5].sum()) > 0  # slice 7 (label 3, effusion) in training
    # HU through the lung window: -600 HU -> ~0.5, -1000 HU -> ~0.23
    img = val.images[0, 0].float() / 255.0
    assert float(img[16, 8]) == pytest.approx(0.5, abs=0.02)
    assert float(img[0, 0]) == pytest.approx((-1000 + 1350) / 1500, abs=0.02)
    # 8-bit volumes are divided by 255
    _write_nifti_pair(tmp_path / "nii8", hu=False)
    s8 = load_medseg_nifti(tmp_path / "nii8", "all", 32)
    assert len(s8) == 10 and int(s8.images.max()) == 255
    (tmp_path / "nii8" / "extra.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match="exactly one image"):
        load_medseg_nifti(tmp_path / "nii8", "all", 32)


# ----------------------------------------------------------------- DICOM + SEG


def test_dicom_seg_case_maps_frames_by_sop_uid(
    data_dir: Path, tmp_path: Path, make_seg_case: Callable[[Path, Path], list[str]]
) -> None:
    sops = make_seg_case(data_dir, tmp_path / "segdata" / "case1")
    case = read_dicom_seg_case(tmp_path / "segdata" / "case1")
    assert case.hu.shape == (3, 512, 512)
    assert float(case.hu.min()) < -900  # Hounsfield units (air)
    k = case.sop_instance_uids.index(sops[1])
    assert int(case.lesion[k].sum()) == 40 * 60
    assert bool(case.lesion[k, 200:240, 150:210].all())
    others = [i for i in range(3) if i != k]
    assert not case.lesion[others].any()  # lung segment ignored, empty frames omitted

    s = load_dicom_seg(tmp_path / "segdata", "all", 64)
    assert len(s) == 3 and bool(s.has_mask.all()) and not bool(s.has_label.any())
    assert int(s.masks[k].sum()) > 0 and int(s.masks[others].sum()) == 0
    labelled = load_spec(
        DatasetSpec(
            kind="dicom_seg", path=str(tmp_path / "segdata"), split="all", covid_label=False
        ),
        tmp_path,
        64,
    )
    assert bool(labelled.has_label.all()) and float(labelled.labels.sum()) == 0.0
    both = concat_slice_sets([s, labelled])
    assert len(both) == 6


def test_dicom_seg_errors(data_dir: Path, tmp_path: Path) -> None:
    case = tmp_path / "bad" / "c1"
    case.mkdir(parents=True)
    src = sorted((data_dir / "dicom" / "lung-pet-ct-dx-a0002").glob("*.dcm"))[0]
    shutil.copy(src, case / src.name)
    with pytest.raises(DataError, match="no DICOM SEG"):
        read_dicom_seg_case(case)
    with pytest.raises(DataError, match="no case subfolders"):
        load_dicom_seg(tmp_path / "bad" / "c1", "all", 64)
    with pytest.raises(DataError, match="not found"):
        load_spec(DatasetSpec(kind="covid_ct", path="nowhere"), tmp_path, 64)


def test_class_labels_can_be_dropped_per_data_set(mini_data: Path) -> None:
    spec = DatasetSpec(kind="medseg_png", path="medseg-100", split="val", use_class_label=False)
    s = load_spec(spec, mini_data, 64)
    assert not bool(s.has_label.any()) and bool(s.has_mask.all())
    assert s.summary()["with_label"] == 0
