"""Fixtures for the node tests: series derived from the real ones, configs in temp folders,
C-STORE with pynetdicom. The real series, the tiny checkpoint, in-process nodes and DCMTK
storescp are shared (tests/conftest.py, tests/helpers.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.config import NodeConfig, load_config


def derive_series(
    sources: list[Path],
    out_dir: Path,
    edit: Callable[[Dataset, int], None] | None = None,
    keep_pixels: bool = True,
) -> list[Path]:
    """Copy real instances into a new series (new study/series/SOP UIDs), optionally edited.

    `edit(ds, index)` may change any attribute (modality, image type, thickness...).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i, src in enumerate(sources):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        if edit is not None:
            edit(ds, i)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        path = out_dir / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., NodeConfig]:
    """A NodeConfig with a temp spool/SQLite, port 0 and short timings; sections override."""

    def make(**sections: Any) -> NodeConfig:
        base: dict[str, Any] = {
            "node": {"port": 0, "ae_title": "CTMTL"},
            "spool": {"path": str(tmp_path / "spool"), "min_free_mb": 0},
            "completion": {"idle_seconds": 1.0, "poll_interval_s": 0.2},
            "worker": {"poll_interval_s": 0.2},
            "export": {"poll_interval_s": 0.2, "initial_backoff_s": 0.2, "max_backoff_s": 1.0},
            "model": {"engine": "torch"},  # the reference; the OpenVINO engine has its own tests
        }
        merged = copy.deepcopy(base)
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
        return load_config(None, environ={}, overrides=merged)

    return make


def store_files(
    port: int, files: list[Path], calling_ae: str = "TESTSCU", called_ae: str = "CTMTL"
) -> list[int]:
    """C-STORE files over one pynetdicom association; return the statuses."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f, stop_before_pixels=False) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    seen: set[tuple[str, str]] = set()
    for ds in datasets:
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key not in seen:
            seen.add(key)
            ae.add_requested_context(*key)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association with the node failed"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


@pytest.fixture(scope="session")
def pipeline_result(
    noncovid_files: list[Path], tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """SEG + SR of the real 30-slice series, made once by the processing pipeline."""
    from dicom_node.pipeline import process_series
    from mtl_model import Predictor

    predictor = Predictor(checkpoint=tiny_checkpoint, device="cpu", precision="fp32")
    return process_series(noncovid_files, tmp_path_factory.mktemp("result"), predictor)
