"""Database: migrations match the models, idempotent ingest, job and delivery claiming."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from dicom_node.db import (
    Base,
    Database,
    Delivery,
    DeliveryState,
    InstanceRecord,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
    claim_deliveries,
    claim_job,
    record_instance,
    renew_job_lease,
    utcnow,
)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    database.upgrade()
    yield database
    database.dispose()


def _rec(sop: str, series: str = "1.2.3.4", sha: str = "a" * 64, size: int = 10) -> InstanceRecord:
    return InstanceRecord(
        study_uid="1.2.3",
        series_uid=series,
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/spool/{sop}.dcm",
        size=size,
        sha256=sha,
        modality="CT",
        calling_ae="PACS",
        calling_host="127.0.0.1",
        called_ae="CTMTL",
    )


def _head(db: Database) -> str:
    from alembic.script import ScriptDirectory

    from dicom_node.db import alembic_config

    head = ScriptDirectory.from_config(alembic_config(str(db.engine.url))).get_current_head()
    assert head is not None
    return head


def test_migrations_create_exactly_the_models(db: Database) -> None:
    assert db.current_revision() == _head(db)
    tables = set(inspect(db.engine).get_table_names())
    assert {"studies", "series", "instances", "jobs", "results", "deliveries"} <= tables
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    db.upgrade()  # idempotent at head


def test_resent_instance_is_idempotent(db: Database) -> None:
    first = record_instance(db, _rec("1.2.3.4.1"))
    again = record_instance(db, _rec("1.2.3.4.1"))
    assert first.new_instance and not again.new_instance and not again.content_changed
    record_instance(db, _rec("1.2.3.4.2"))
    with db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.n_instances == 2
        assert series.received_bytes == 20
        assert series.state == SeriesState.RECEIVING


def test_new_instance_after_completion_reopens_series(db: Database) -> None:
    record_instance(db, _rec("1.2.3.4.1"))
    with db.session() as s:
        s.scalars(select(Series)).one().state = SeriesState.DONE
    same = record_instance(db, _rec("1.2.3.4.1"))  # identical re-send: nothing changes
    assert not same.series_reopened
    changed = record_instance(db, _rec("1.2.3.4.1", sha="b" * 64, size=12))
    assert changed.series_reopened and changed.content_changed
    with db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.state == SeriesState.RECEIVING
        assert series.n_instances == 1 and series.received_bytes == 12


def test_concurrent_first_instances_of_one_series(db: Database) -> None:
    errors: list[BaseException] = []

    def store(i: int) -> None:
        try:
            record_instance(db, _rec(f"1.2.3.4.{i}"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(i,)) for i in range(1, 17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.n_instances == 16


def _job(db: Database) -> int:
    record_instance(db, _rec("1.2.3.4.1"))
    with db.session() as s:
        series = s.scalars(select(Series)).one()
        job = Job(series_id=series.id, state=JobState.QUEUED, n_instances=1, attempts=0)
        s.add(job)
        s.flush()
        return job.id


def test_only_one_of_many_claimers_gets_the_job(db: Database) -> None:
    job_id = _job(db)
    got: list[int | None] = []
    lock = threading.Lock()

    def claim(name: str) -> None:
        r = claim_job(db, name, 60, 3)
        with lock:
            got.append(r)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(g for g in got if g is not None) == [job_id]
    assert got.count(None) == 7


def test_expired_lease_is_taken_over(db: Database) -> None:
    job_id = _job(db)
    now = utcnow()
    assert claim_job(db, "dead-worker", 30, 3, now=now) == job_id
    assert claim_job(db, "other", 30, 3, now=now + dt.timedelta(seconds=10)) is None
    assert renew_job_lease(db, job_id, "dead-worker", 30)
    later = utcnow() + dt.timedelta(seconds=31)
    assert claim_job(db, "other", 30, 3, now=later) == job_id
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.lease_owner == "other" and job.attempts == 2
    assert not renew_job_lease(db, job_id, "dead-worker", 30)  # it lost the job


def test_job_lost_too_often_fails(db: Database) -> None:
    job_id = _job(db)
    t = utcnow()
    for i in range(2):
        assert claim_job(db, f"w{i}", 1, 2, now=t + dt.timedelta(seconds=10 * i)) == job_id
    assert claim_job(db, "w9", 1, 2, now=t + dt.timedelta(seconds=30)) is None
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.FAILED
        assert "lost the job 2 times" in (job.error or "")


def test_deliveries_claimed_one_per_destination(db: Database) -> None:
    job_id = _job(db)
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        ids = []
        for k in range(2):
            r = Result(
                job_id=job_id if k == 0 else _job_in(s, job.series_id),
                series_id=job.series_id,
                covid_probability=0.5,
                lesion_volume_ml=1.0,
                seg_path="seg.dcm",
                sr_path="sr.dcm",
            )
            s.add(r)
            s.flush()
            for dest in ("pacs", "archive"):
                d = Delivery(
                    result_id=r.id, destination=dest, ae_title="X", host="127.0.0.1", port=1
                )
                s.add(d)
                s.flush()
                ids.append(d.id)
    first = claim_deliveries(db, "exp", 60, limit=10)
    assert len(first) == 2  # one per destination
    second = claim_deliveries(db, "exp", 60, limit=10, exclude_destinations={"pacs", "archive"})
    assert second == []
    with db.session() as s:
        states = {d.id: d.state for d in s.scalars(select(Delivery))}
    assert sorted(k for k, v in states.items() if v == DeliveryState.SENDING) == sorted(first)


def _job_in(s: object, series_id: int) -> int:
    job = Job(series_id=series_id, state=JobState.DONE, n_instances=1, attempts=1)
    s.add(job)  # type: ignore[attr-defined]
    s.flush()  # type: ignore[attr-defined]
    return job.id


def test_a_database_of_the_first_release_moves_forward_keeping_its_rows(tmp_path: Path) -> None:
    old = Database(f"sqlite:///{tmp_path / 'old.db'}")
    old.upgrade("0001_initial")
    with old.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO studies (id, study_instance_uid, created_at) "
            "VALUES (1, '1.2.3', '2026-01-01')"
        )
        conn.exec_driver_sql(
            "INSERT INTO series (id, study_id, series_instance_uid, state, n_instances, "
            "received_bytes, first_received_at, last_received_at, updated_at) "
            "VALUES (1, 1, '1.2.3.4', 'done', 3, 30, '2026-01-01', '2026-01-01', '2026-01-01')"
        )
    old.upgrade()
    assert old.current_revision() == _head(old)
    with old.session() as s:
        series = s.scalars(select(Series)).one()
        assert (series.state, series.n_instances, series.refusals) == ("done", 3, None)
    old.dispose()
