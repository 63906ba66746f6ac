"""Group commit of received instances (`dicom_node.index`) against a real SQLite database
and spool: batches form while the database is busy, each instance still gets its own
answer, and nothing is left behind for an instance that was not stored."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.db import Database, Instance, InstanceConflict, InstanceRecord, Series
from dicom_node.index import IndexWriter, image_identity
from dicom_node.spool import Spool

STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Database, Spool, IndexWriter]]:
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.upgrade()
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    yield db, spool, IndexWriter(db, spool)
    db.dispose()


def _file(series: str, sop: str, number: int, z: float = 0.0) -> bytes:
    """A small DICOM file of one image (what the SCP would write)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, z]
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _submit(
    spool: Spool, writer: IndexWriter, series: str, sop: str, data: bytes
) -> tuple[object, object]:
    pending = spool.write_pending(STUDY, series, sop, (data,))
    record = InstanceRecord(
        study_uid=STUDY,
        series_uid=series,
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        path=str(pending.path),
        size=pending.size,
        sha256=pending.sha256,
        modality="CT",
        calling_ae="TESTSCU",
        calling_host="127.0.0.1",
        called_ae="CTMTL",
        open_for_s=30.0,
    )
    ds = pydicom.dcmread(pending.temp, stop_before_pixels=True)
    return writer.submit(record, pending, lambda: image_identity(ds))


def _parts_left(spool: Spool) -> list[Path]:
    return sorted(spool.incoming.rglob("*.part"))


def _while_locked(db: Database, seconds: float, work: list[threading.Thread]) -> None:
    """Start `work` while another connection holds SQLite's write lock for `seconds`:
    the first thread to commit waits for it and the others queue behind, so they are
    committed together (a batch), deterministically."""
    with db.engine.connect() as holder:
        held = holder.begin()  # BEGIN IMMEDIATE, as every transaction of the node
        for k, t in enumerate(work):
            t.start()
            if k == 0:
                time.sleep(0.2)  # the first leads and waits for the lock; the rest queue
        time.sleep(seconds)
        held.rollback()
    for t in work:
        t.join(30)
        assert not t.is_alive()


def test_rows_queued_during_a_commit_are_committed_together_and_each_answered(
    parts: tuple[Database, Spool, IndexWriter],
) -> None:
    db, spool, writer = parts
    answers: dict[str, object] = {}

    def send(k: int) -> None:
        series = f"{STUDY}.{k % 3}"
        sop = f"{series}.{k}"
        answers[sop] = _submit(spool, writer, series, sop, _file(series, sop, k))

    _while_locked(db, 1.0, [threading.Thread(target=send, args=(k,)) for k in range(24)])
    assert len(answers) == 24 and writer.rows == 24
    # the first waited for the lock alone, the others queued behind it (one batch or a few)
    assert writer.batches <= 6, writer.batches
    with db.session() as s:
        rows = s.scalars(select(Instance)).all()
        counts = dict(s.execute(select(Series.series_instance_uid, Series.n_instances)).all())
    assert len(rows) == 24 and sorted(counts.values()) == [8, 8, 8]
    for row in rows:
        assert Path(row.path).is_file()
        assert pydicom.dcmread(row.path).SOPInstanceUID == row.sop_instance_uid
    assert not _parts_left(spool)
    outcomes = [a[0] for a in answers.values()]  # type: ignore[index]
    assert all(o.new_instance and o.content_changed for o in outcomes)  # type: ignore[attr-defined]
    assert sum(o.new_series for o in outcomes) == 3  # type: ignore[attr-defined]


def test_a_conflict_in_a_batch_refuses_that_instance_only(
    parts: tuple[Database, Spool, IndexWriter],
) -> None:
    db, spool, writer = parts
    first, second = f"{STUDY}.1", f"{STUDY}.2"
    taken = f"{first}.7"
    _submit(spool, writer, first, taken, _file(first, taken, 7))
    errors: dict[tuple[str, str], Exception] = {}

    def send(series: str, sop: str, number: int) -> None:
        try:
            _submit(spool, writer, series, sop, _file(series, sop, number))
        except Exception as exc:
            errors[series, sop] = exc

    work = [threading.Thread(target=send, args=(second, f"{second}.{k}", k)) for k in range(5)]
    work.append(threading.Thread(target=send, args=(second, taken, 9)))  # another series' UID
    work.append(threading.Thread(target=send, args=(first, taken, 8)))  # another image, same UID
    _while_locked(db, 1.0, work)
    assert sorted(errors) == [(first, taken), (second, taken)]
    assert all(isinstance(e, InstanceConflict) for e in errors.values())
    assert str(errors[second, taken]) == f"SOP Instance UID already belongs to series {first}"
    assert str(errors[first, taken]).startswith(
        "SOP Instance UID already names another image of this series (instance 7)"
    )
    with db.session() as s:
        owner = s.scalar(
            select(Series.series_instance_uid)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_instance_uid == taken)
        )
        n_second = s.scalar(select(Series.n_instances).where(Series.series_instance_uid == second))
    assert owner == first and n_second == 5
    assert pydicom.dcmread(spool.instance_path(STUDY, first, taken)).InstanceNumber == 7
    assert not spool.instance_path(STUDY, second, taken).exists()
    assert not _parts_left(spool)


def test_the_same_instance_twice_in_one_batch_is_one_row_received_twice(
    parts: tuple[Database, Spool, IndexWriter],
) -> None:
    db, spool, writer = parts
    series = f"{STUDY}.3"
    sop = f"{series}.1"
    data = _file(series, sop, 1)
    lead = (spool, writer, series, f"{series}.2", _file(series, f"{series}.2", 2))
    work = [threading.Thread(target=_submit, args=lead)]
    work += [
        threading.Thread(target=_submit, args=(spool, writer, series, sop, data)) for _ in range(2)
    ]
    _while_locked(db, 1.0, work)
    assert (writer.batches, writer.rows) == (2, 3)  # the two copies in one transaction
    with db.session() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        n = s.scalar(select(Series.n_instances))
    assert row.times_received == 2 and n == 2
    assert not _parts_left(spool)


def test_a_database_failure_leaves_no_file_and_says_so(
    parts: tuple[Database, Spool, IndexWriter],
) -> None:
    db, spool, writer = parts
    series = f"{STUDY}.4"
    _submit(spool, writer, series, f"{series}.1", _file(series, f"{series}.1", 1))
    with db.engine.begin() as conn:  # a broken database: the instances table is gone
        conn.execute(text("DROP TABLE instances"))
    with pytest.raises(SQLAlchemyError):
        _submit(spool, writer, series, f"{series}.2", _file(series, f"{series}.2", 2))
    assert not spool.instance_path(STUDY, series, f"{series}.2").exists()
    assert spool.instance_path(STUDY, series, f"{series}.1").exists()
    assert not _parts_left(spool)
