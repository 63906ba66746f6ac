"""Fixtures for the training tests: a small data root made of real files, tiny configs."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.config import ExperimentConfig, parse_config


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: tiny models on a shared 2-core CPU run far steadier that way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mini_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root in the shared layout holding a few real images (symlinks, nothing copied).

    covid-ct: 6 COVID + 6 non-COVID train and 4 + 4 val images from the official lists;
    medseg-100: the first 15 MedSeg slices (fixed split: 3 val, 12 train);
    luna16-3: slices 40-47 of each of the 3 LUNA16 patients (8-slice stacks).
    """
    root = tmp_path_factory.mktemp("mini_data")
    src = data_dir / "covid-ct"
    dst = root / "covid-ct"
    (dst / "split").mkdir(parents=True)
    for folder, tag in (("CT_COVID", "COVID"), ("CT_NonCOVID", "NonCOVID")):
        (dst / folder).mkdir()
        for split, k in (("train", 6), ("val", 4)):
            lines = (src / "split" / f"{split}CT_{tag}.txt").read_text().split()
            names = lines[:k]
            for n in names:
                (dst / folder / n).symlink_to(src / folder / n)
            (dst / "split" / f"{split}CT_{tag}.txt").write_text("\n".join(names) + "\n")
    ms = data_dir / "medseg-100"
    for sub in ("images", "masks"):
        (root / "medseg-100" / sub).mkdir(parents=True)
    for n in sorted(p.name for p in (ms / "images").iterdir())[:15]:
        for sub in ("images", "masks"):
            (root / "medseg-100" / sub / n).symlink_to(ms / sub / n)
    for patient in sorted((data_dir / "luna16-3").iterdir()):
        (root / "luna16-3" / patient.name).mkdir(parents=True)
        for f in sorted(patient.glob("*.png"))[40:48]:
            (root / "luna16-3" / patient.name / f.name).symlink_to(f)
    return root


def _make_seg_case(data_dir: Path, case: Path, n: int = 3) -> list[str]:
    """Copy n real CT slices and write a SEG (lesion on the middle slice, lung on all)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    src = sorted((data_dir / "dicom" / "lung-pet-ct-dx-a0002").glob("*.dcm"))[10 : 10 + n]
    case.mkdir(parents=True)
    for p in src:
        shutil.copy(p, case / p.name)
    ct = [pydicom.dcmread(case / p.name) for p in src]
    rows, cols = int(ct[0].Rows), int(ct[0].Columns)
    px = np.zeros((n, rows, cols, 2), dtype=bool)
    px[1, 200:240, 150:210, 0] = True  # lesion on the second file only
    px[:, 100:400, 100:400, 1] = True  # lung, must be ignored
    algo = hd.AlgorithmIdentificationSequence(
        name="test", version="1", family=codes.DCM.ArtificialIntelligence
    )
    descs = [
        hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="Lesion",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        ),
        hd.seg.SegmentDescription(
            segment_number=2,
            segment_label="Lung",
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=codes.SCT.Lung,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        ),
    ]
    seg = hd.seg.Segmentation(
        source_images=ct,
        pixel_array=px,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ctmtl tests",
        manufacturer_model_name="corrected",
        software_versions="0",
        device_serial_number="1",
    )
    seg.save_as(case / "seg.dcm")
    return [str(d.SOPInstanceUID) for d in ct]


@pytest.fixture()
def make_seg_case() -> Callable[..., list[str]]:
    """Factory: a case folder with real CT slices and a highdicom SEG referencing them."""
    return _make_seg_case


TinyConfig = Callable[..., ExperimentConfig]


@pytest.fixture()
def tiny_config() -> TinyConfig:
    """Factory of width-4, 64x64 three-task experiments on the mini data root."""
    return _tiny_config


def _tiny_config(**overrides: Any) -> ExperimentConfig:
    raw: dict[str, Any] = {
        "name": "tiny",
        "seed": 3,
        "model": {"architecture": "mtl", "base_width": 4, "input_size": 64},
        "data": {
            "train": [
                {"kind": "covid_ct", "path": "covid-ct", "split": "train"},
                {"kind": "medseg_png", "path": "medseg-100", "split": "train"},
            ],
            "val": [
                {"kind": "covid_ct", "path": "covid-ct", "split": "val"},
                {"kind": "medseg_png", "path": "medseg-100", "split": "val"},
            ],
        },
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "precision": "fp32"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return parse_config(raw)
