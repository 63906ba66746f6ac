"""Completion: idle series are judged; rejected ones keep a reason and get no job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.db import Job, JobState, Series, SeriesState, claim_job
from dicom_node.service import NodeService
from helpers import wait_for

from .conftest import derive_series, store_files

MR = "1.2.840.10008.5.1.4.1.1.4"


def _series(node: NodeService, uid: str) -> Series | None:
    with node.db.session() as s:
        return s.scalars(select(Series).where(Series.series_instance_uid == uid)).first()


def _jobs(node: NodeService, uid: str) -> list[Job]:
    with node.db.session() as s:
        return list(
            s.scalars(
                select(Job).join(Series).where(Series.series_instance_uid == uid).order_by(Job.id)
            )
        )


def _settled(node: NodeService, uid: str) -> Series | None:
    se = _series(node, uid)
    return se if se is not None and se.state != SeriesState.RECEIVING else None


@pytest.fixture
def node(
    make_config: Callable[..., NodeConfig], start_node: Callable[..., NodeService]
) -> NodeService:
    return start_node(make_config(completion={"idle_seconds": 1.0}), worker=False, exporter=False)


def _as_mr(ds: Dataset, _i: int) -> None:
    ds.SOPClassUID = MR
    ds.Modality = "MR"


def _localizer(ds: Dataset, _i: int) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


def _thick(ds: Dataset, _i: int) -> None:
    ds.SliceThickness = "10"


@pytest.mark.slow
def test_rejected_series_get_reason_and_no_job(
    node: NodeService, noncovid_files: list[Path], tmp_path: Path
) -> None:
    cases = {
        "mr": (derive_series(noncovid_files, tmp_path / "mr", _as_mr), "modality MR"),
        "localizer": (
            derive_series(noncovid_files[:2], tmp_path / "loc", _localizer),
            "LOCALIZER",
        ),
        "thick": (derive_series(noncovid_files, tmp_path / "thick", _thick), "slice thickness 10"),
        "gap": (
            derive_series(noncovid_files[:12] + noncovid_files[13:], tmp_path / "gap"),
            "geometry: 1 missing slice",
        ),
        "good": (derive_series(noncovid_files, tmp_path / "good"), None),
    }
    for files, _ in cases.values():
        assert set(store_files(node.port, files)) == {0}
    import pydicom

    for name, (files, fragment) in cases.items():
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        series = wait_for(lambda uid=uid: _settled(node, uid), 30, f"series {name} judged")
        jobs = _jobs(node, uid)
        if fragment is None:
            assert series.state == SeriesState.QUEUED and series.reason is None
            assert [j.state for j in jobs] == [JobState.QUEUED]
        else:
            assert series.state == SeriesState.REJECTED, name
            assert fragment in (series.reason or ""), (name, series.reason)
            assert jobs == [], name


@pytest.mark.slow
def test_instance_after_start_makes_a_new_job(
    node: NodeService, noncovid_files: list[Path], tmp_path: Path
) -> None:
    files = derive_series(noncovid_files, tmp_path / "s")
    import pydicom

    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    store_files(node.port, files[:-2])
    wait_for(lambda: _settled(node, uid), 30, "first completion")
    first = _jobs(node, uid)
    assert [j.state for j in first] == [JobState.QUEUED]
    # a worker starts on it...
    assert claim_job(node.db, "test-worker", 300, 3) == first[0].id
    # ...and late instances arrive: the series is judged again and gets a second job
    store_files(node.port, files[-2:])
    wait_for(lambda: len(_jobs(node, uid)) == 2, 30, "second job")
    jobs = _jobs(node, uid)
    assert [j.state for j in jobs] == [JobState.RUNNING, JobState.QUEUED]
    assert jobs[1].n_instances == len(files)
    # one more late instance while the second job still waits: it is superseded
    extra = derive_series(noncovid_files[:1], tmp_path / "x")[0]
    ds = pydicom.dcmread(extra)
    ref = pydicom.dcmread(files[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.StudyInstanceUID, ref.SeriesInstanceUID
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 8]
    ds.save_as(extra)
    store_files(node.port, [extra])
    wait_for(lambda: len(_jobs(node, uid)) == 3, 30, "third job")
    assert [j.state for j in _jobs(node, uid)] == [
        JobState.RUNNING,
        JobState.SUPERSEDED,
        JobState.QUEUED,
    ]


def test_identical_resend_after_completion_changes_nothing(
    node: NodeService, noncovid_files: list[Path], tmp_path: Path
) -> None:
    files = derive_series(noncovid_files[:20], tmp_path / "s")
    import pydicom

    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    store_files(node.port, files)
    wait_for(lambda: _settled(node, uid), 30, "completion")
    store_files(node.port, files[:3])
    series = _series(node, uid)
    assert series is not None and series.state == SeriesState.QUEUED
    assert len(_jobs(node, uid)) == 1


@pytest.mark.parametrize(
    "sop_class", ["1.2.840.10008.5.1.4.1.1.2.2", "1.2.840.10008.5.1.4.1.1.2.1"]
)
def test_multiframe_ct_is_received_and_accepted(
    node: NodeService, noncovid_files: list[Path], tmp_path: Path, sop_class: str
) -> None:
    """One (Legacy Converted) Enhanced CT instance with 30 frames makes one job."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    sources = [pydicom.dcmread(f) for f in noncovid_files]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        sources,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    mf.SOPClassUID = sop_class  # same header layout: exercises Enhanced CT acceptance too
    mf.file_meta.MediaStorageSOPClassUID = sop_class
    path = tmp_path / "multiframe.dcm"
    mf.save_as(path, enforce_file_format=True)
    assert store_files(node.port, [path]) == [0]
    uid = str(mf.SeriesInstanceUID)
    series = wait_for(lambda: _settled(node, uid), 30, "multi-frame series judged")
    assert series.state == SeriesState.QUEUED, series.reason
    assert [j.state for j in _jobs(node, uid)] == [JobState.QUEUED]
