"""Receive faults (issue 13, items 2, 4, 10, 11, 13 and the UID cases): what a hostile or
careless sender does over real associations to an in-process node, and what is kept.

Bad inputs are made with pydicom from the real 30-slice series; the sender is pynetdicom,
in this process or (for a sender killed mid-series) in a child process killed by SIGKILL.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node.conftest import derive_series, store_files
from node.conftest import make_config as make_config
from prometheus_client import generate_latest
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.config import NodeConfig, effective_toml
from dicom_node.db import Instance, Series, SeriesState
from dicom_node.service import NodeService
from dicom_node.volume import SeriesRejected, load_series
from helpers import NODE_CLI, dcmtk_tool, wait_for

pytestmark = pytest.mark.data


def _series_row(node: NodeService, uid: str) -> Series:
    with node.db.session() as s:
        row = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        s.expunge(row)
        return row


def _instance_paths(node: NodeService, uid: str) -> dict[str, str]:
    with node.db.session() as s:
        rows = s.execute(
            select(Instance.sop_instance_uid, Instance.path)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_instance_uid == uid)
        ).all()
    return {sop: path for sop, path in rows}


def _uid(path: Path, keyword: str = "SeriesInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


@pytest.fixture
def receiver(
    make_config: Callable[..., NodeConfig], start_node: Callable[..., NodeService]
) -> NodeService:
    """A node that receives and judges series (no worker: nothing here needs inference)."""
    return start_node(make_config(), worker=False, exporter=False)


# ------------------------------------------------------------- item 2: SOP UID reused


def test_a_sop_instance_uid_of_another_series_is_refused_and_the_first_series_is_untouched(
    receiver: NodeService, noncovid_files: list[Path], tmp_path: Path
) -> None:
    first = derive_series(noncovid_files[:6], tmp_path / "first")
    first_uids = [_uid(p, "SOPInstanceUID") for p in first]

    def reuse(ds: Dataset, i: int) -> None:  # an anonymiser that keeps the SOP UIDs
        ds.SOPInstanceUID = first_uids[i]
        ds.file_meta.MediaStorageSOPInstanceUID = first_uids[i]

    second = derive_series(noncovid_files[6:12], tmp_path / "second", edit=reuse)
    assert store_files(receiver.port, first) == [0] * 6
    first_uid, second_uid = _uid(first[0]), _uid(second[0])
    wait_for(lambda: _series_row(receiver, first_uid).state != SeriesState.RECEIVING, 30, "judged")
    before = _instance_paths(receiver, first_uid)

    assert store_files(receiver.port, second) == [0xA900] * 6

    assert _instance_paths(receiver, first_uid) == before  # never repointed
    assert all(Path(p).is_file() for p in before.values())
    assert _series_row(receiver, first_uid).n_instances == 6
    row = wait_for(
        lambda: (r := _series_row(receiver, second_uid)).state == SeriesState.REJECTED and r,
        30,
        "second series rejected",
    )
    assert row.n_instances == 0
    assert row.refusals == {f"SOP Instance UID already belongs to series {first_uid}": 6}
    assert "no instance was accepted" in (row.reason or "")
    assert "6 instance(s) refused at C-STORE: SOP Instance UID already belongs to series " in (
        row.reason or ""
    )
    assert not list((receiver.spool.incoming / _uid(second[0], "StudyInstanceUID")).rglob("*.dcm"))
    # an administrator sees it in `status`
    config = tmp_path / "node.toml"
    config.write_text(effective_toml(receiver.config))
    shown = subprocess.run(
        [*NODE_CLI, "status", "--config", str(config), "--state", "rejected"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert second_uid in shown.stdout
    assert "SOP Instance UID already belongs to series" in shown.stdout


def test_a_sop_instance_uid_used_twice_in_one_series_is_refused_but_a_correction_replaces(
    receiver: NodeService, noncovid_files: list[Path], tmp_path: Path
) -> None:
    files = derive_series(noncovid_files[:5], tmp_path / "s")
    dup_uid = _uid(files[1], "SOPInstanceUID")
    # another image (instance number and position of slice 3) under slice 1's SOP UID
    other = pydicom.dcmread(files[3])
    other.SOPInstanceUID = dup_uid
    other.file_meta.MediaStorageSOPInstanceUID = dup_uid
    clash = tmp_path / "clash.dcm"
    other.save_as(clash, enforce_file_format=True)
    # the same image corrected (a header fix): same instance number and position
    fixed = pydicom.dcmread(files[1])
    fixed.SeriesDescription = "corrected"
    correction = tmp_path / "correction.dcm"
    fixed.save_as(correction, enforce_file_format=True)

    assert store_files(receiver.port, [*files[:3], clash, correction]) == [0, 0, 0, 0xA900, 0]
    series_uid = _uid(files[0])
    paths = _instance_paths(receiver, series_uid)
    assert len(paths) == 3
    stored = pydicom.dcmread(paths[dup_uid], stop_before_pixels=True)
    assert stored.SeriesDescription == "corrected"
    assert stored.InstanceNumber == pydicom.dcmread(files[1]).InstanceNumber
    refusals = _series_row(receiver, series_uid).refusals or {}
    (reason,) = refusals
    assert reason.startswith("SOP Instance UID already names another image of this series")


# ------------------------------------------------- UIDs that results could not reference


def test_uuid_and_empty_uids_are_refused_at_c_store_with_one_line_each(
    receiver: NodeService,
    noncovid_files: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def bad(ds: Dataset, i: int) -> None:
        if i == 0:
            value = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"  # a UUID string, not a UID
            ds.SOPInstanceUID = value
            ds.file_meta.MediaStorageSOPInstanceUID = value
        elif i == 1:
            ds.FrameOfReferenceUID = ""

    files = derive_series(noncovid_files[:3], tmp_path / "s", edit=bad)
    caplog.set_level(logging.INFO)
    # DCMTK sends the files as they are; every log record here is then the node's
    proc = subprocess.run(
        [dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "CTMTL", "--no-halt",
         "127.0.0.1", str(receiver.port), *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = _series_row(receiver, _uid(files[0]))
    assert row.refusals == {
        "SOP Instance UID is not a valid UID (only digits and dots)": 1,
        "Frame of Reference UID is empty: results could not be placed on this image": 1,
    }
    assert row.n_instances == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one line per problem
    assert all(r.name == "dicom_node.scp" for r in warnings)


def test_series_checks_name_the_attribute_and_count_before_any_decoding(
    noncovid_files: list[Path], tmp_path: Path
) -> None:
    def no_frame(ds: Dataset, i: int) -> None:
        if i % 2 == 0:
            ds.FrameOfReferenceUID = ""

    files = derive_series(noncovid_files[:6], tmp_path / "s", edit=no_frame)
    with pytest.raises(SeriesRejected) as err:
        load_series(files)
    assert "Frame of Reference UID (FrameOfReferenceUID) is empty in 3 of 6 instance(s)" in str(
        err.value
    )


# ------------------------------------------------------- item 10: absurd Rows/Columns


def _absurd(src: Path, dest: Path) -> Path:
    ds = pydicom.dcmread(src)
    assert ds.file_meta.TransferSyntaxUID.is_compressed  # RICORD: JPEG Lossless
    ds.Rows = ds.Columns = 60000  # 60000 x 60000 x 16 bit: 6.7 GiB to decode
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_compressed_pixel_data_with_absurd_rows_and_columns_is_refused_before_decoding(
    receiver: NodeService, covid_files: list[Path], tmp_path: Path
) -> None:
    files = derive_series(covid_files[100:102], tmp_path / "s")
    absurd = _absurd(files[1], tmp_path / "absurd.dcm")
    t0 = time.monotonic()
    assert store_files(receiver.port, [files[0], absurd]) == [0, 0xC000]
    assert time.monotonic() - t0 < 20
    (reason,) = _series_row(receiver, _uid(files[0])).refusals or {}
    assert "decoded pixel data would be 6,866 MiB (60000 x 60000" in reason
    with pytest.raises(SeriesRejected, match="over the limit of 1,024 MiB"):
        load_series([files[0], absurd])


# ------------------------------------------ item 4: a transfer cut off mid-series


_KILLED_SENDER = textwrap.dedent(
    """
    import os, signal, sys
    import pydicom
    from pynetdicom import AE
    port, n, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    ae = AE(ae_title="KILLED")
    ds0 = pydicom.dcmread(files[0])
    ae.add_requested_context(ds0.SOPClassUID, ds0.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTMTL")
    assert assoc.is_established
    for f in files[:n]:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
    os.kill(os.getpid(), signal.SIGKILL)  # the sender dies: no release, no abort
    """
)


def test_a_transfer_cut_off_mid_series_is_logged_and_waits_for_the_longer_quiet_time(
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    noncovid_files: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = make_config(completion={"idle_seconds": 1.0, "interrupted_idle_seconds": 6.0})
    node = start_node(cfg, worker=False, exporter=False)
    files = derive_series(noncovid_files, tmp_path / "s")
    caplog.set_level(logging.INFO, logger="dicom_node")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SENDER, str(node.port), "25", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    cut_at = time.monotonic()
    series_uid = _uid(files[0])
    wait_for(
        lambda: "dropped (connection closed without release): 25 instance(s) stored" in caplog.text,
        10,
        "the association end logged",
    )
    row = _series_row(node, series_uid)
    assert row.receive_interrupted == "dropped (connection closed without release)"
    time.sleep(3.0)  # past idle_seconds: an ordinary series would have been judged
    assert _series_row(node, series_uid).state == SeriesState.RECEIVING
    judged = wait_for(
        lambda: (r := _series_row(node, series_uid)).state != SeriesState.RECEIVING and r,
        30,
        "judged after the longer quiet time",
    )
    assert time.monotonic() - cut_at >= 5.0
    assert "judged after its last association was dropped" in caplog.text

    # the sender comes back and sends the whole series: a clean release clears the mark
    assert store_files(node.port, files) == [0] * 30
    assert "released: 30 instance(s) stored, 0 refused, 1 series" in caplog.text
    assert _series_row(node, series_uid).receive_interrupted is None
    assert judged.n_instances == 25


# ------------------------------------------------- item 11: association limits


def _hold(port: int, calling: str, n: int) -> list[Any]:
    out = []
    for _ in range(n):
        ae = AE(ae_title=calling)
        ae.add_requested_context("1.2.840.10008.1.1")
        out.append(ae.associate("127.0.0.1", port, ae_title="CTMTL"))
    return out


def test_associations_over_the_limits_are_refused_logged_and_counted(
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = make_config(node={"max_associations": 3, "max_associations_per_caller": 2})
    node = start_node(cfg, worker=False, exporter=False)
    caplog.set_level(logging.INFO, logger="dicom_node")
    greedy = _hold(node.port, "GREEDY", 3)
    try:
        assert [a.is_established for a in greedy] == [True, True, False]
        assert "calling AE title 'GREEDY' from 127.0.0.1 already holds 2 association(s)" in (
            caplog.text
        )
        other = _hold(node.port, "OTHER", 2)
        assert [a.is_established for a in other] == [True, False]  # 3 of 3 open
        assert "(node.max_associations = 3)" in caplog.text
        for a in other:
            if a.is_established:
                a.release()
    finally:
        for a in greedy:
            if a.is_established:
                a.release()
    assert node.scp is not None and node.scp.stats.rejected_associations == 2
    text = generate_latest(node.metrics.registry).decode()
    assert 'ctmtl_associations_total{outcome="rejected"} 2.0' in text
    wait_for(lambda: "released: 0 instance(s) stored" in caplog.text, 10, "end logged")


def test_every_association_end_is_logged_with_counts(
    receiver: NodeService,
    noncovid_files: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = derive_series(noncovid_files[:2], tmp_path / "s")
    caplog.set_level(logging.INFO, logger="dicom_node")
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(_uid(files[0], "SOPClassUID"), "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CTMTL")
    assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
    assoc.abort()
    wait_for(
        lambda: (
            "aborted by the peer (A-ABORT): 1 instance(s) stored, 0 refused, 1 series"
            in caplog.text
        ),
        10,
        "abort logged",
    )


def test_garbage_bytes_from_a_peer_are_never_echoed_into_the_log(
    receiver: NodeService,
    noncovid_files: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # bytes as on disk
    raw = noncovid_files[3].read_bytes()
    ds = pydicom.dcmread(noncovid_files[3], stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    cases = {
        "garbage UI value": b"\x08\x00\x16\x00UI\xff\xff" + b"\x17" * 600,
        "unknown VR": b"\x08\x00\x16\x00UI\x10\x001.2.3.4.5.6.7.8\x00\xae\xa0\xfc\xdcWD\x08\x00"
        + b"\x1b[31m\x07\x00\x9b\xff",
    }
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    caplog.set_level(logging.WARNING, logger="pydicom")
    for k, data in enumerate(cases.values()):
        path = tmp_path / f"bad{k}.dcm"
        path.write_bytes(raw[:meta_end] + data)
        ae = AE(ae_title="GARBAGE")
        ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CTMTL")
        try:
            assert int(assoc.send_c_store(path).Status) in (0xA900, 0xC000)
        finally:
            assoc.release()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "C-STORE from GARBAGE refused" in m]) == 2
    for m in messages:
        assert m.isprintable() and len(m) < 500, repr(m[:200])


# ---------------------------------- issue 16.6: completion waits for open associations


def test_a_series_is_not_complete_while_its_association_is_still_delivering(
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    noncovid_files: list[Path],
    tmp_path: Path,
) -> None:
    node = start_node(make_config(completion={"idle_seconds": 0.5}), worker=False, exporter=False)
    files = derive_series(noncovid_files[:10], tmp_path / "s")
    series_uid = _uid(files[0])
    ae = AE(ae_title="SLOWPACS")
    ae.add_requested_context(_uid(files[0], "SOPClassUID"), "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CTMTL")
    try:
        for k, f in enumerate(files):
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
            if k in (3, 7):  # a slow burst: pauses far longer than idle_seconds
                time.sleep(2.0)
                assert _series_row(node, series_uid).state == SeriesState.RECEIVING
    finally:
        assoc.release()
    row = wait_for(
        lambda: (r := _series_row(node, series_uid)).state != SeriesState.RECEIVING and r,
        20,
        "judged once the association ended",
    )
    assert row.n_instances == 10 and row.association_open_until is None
