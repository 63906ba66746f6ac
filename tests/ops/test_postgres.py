"""The node database on a real PostgreSQL server: migrations, and job claiming by many
workers at once (`FOR UPDATE SKIP LOCKED` + leases)."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from dicom_node.cli import main
from dicom_node.db import (
    Database,
    InstanceRecord,
    Job,
    JobState,
    claim_job,
    record_instance,
    utcnow,
)
from ops.conftest import write_toml


def test_db_upgrade_command(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_toml(
        tmp_path / "node.toml",
        {"database": {"url": pg_url}, "spool": {"path": str(tmp_path / "spool")}},
    )
    assert main(["db", "upgrade", "--config", str(cfg)]) == 0
    first = capsys.readouterr().out
    assert "upgraded from empty to" in first
    assert "ctmtl@127.0.0.1" in first  # the URL is shown (without a password)
    assert main(["db", "upgrade", "--config", str(cfg)]) == 0
    assert "already at revision" in capsys.readouterr().out
    db = Database(pg_url)
    try:
        assert db.dialect == "postgresql"
        with db.engine.connect() as conn:
            tables = set(
                conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
            )
        assert {"studies", "series", "instances", "jobs", "results", "deliveries"} <= tables
    finally:
        db.dispose()


def test_db_upgrade_reports_an_unreachable_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import free_port

    url = f"postgresql+psycopg2://ctmtl@127.0.0.1:{free_port()}/none"
    cfg = write_toml(tmp_path / "n.toml", {"database": {"url": url}})
    assert main(["db", "upgrade", "--config", str(cfg)]) == 1
    assert "database upgrade failed" in capsys.readouterr().err


def _queue_jobs(db: Database, n: int) -> list[int]:
    ids = []
    for i in range(n):
        outcome = record_instance(
            db,
            InstanceRecord(
                study_uid="1.2.3",
                series_uid=f"1.2.3.{i}",
                sop_uid=f"1.2.3.{i}.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"/spool/{i}.dcm",
                size=10,
                sha256="0" * 64,
            ),
        )
        with db.session() as s:
            job = Job(series_id=outcome.series_id, state=JobState.QUEUED, attempts=0)
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def test_concurrent_claims_take_each_job_once(pg_url: str) -> None:
    db = Database(pg_url)
    db.upgrade()
    try:
        ids = _queue_jobs(db, 40)
        claimed: list[int] = []
        lock = threading.Lock()
        barrier = threading.Barrier(8)

        def worker(n: int) -> None:
            barrier.wait()
            while True:
                job_id = claim_job(db, f"w{n}", lease_seconds=60, max_attempts=3)
                if job_id is None:
                    return
                with lock:
                    claimed.append(job_id)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(claimed) == sorted(ids)
        assert not [j for j, c in Counter(claimed).items() if c > 1]
        with db.session() as s:
            owners = {j.lease_owner for j in s.query(Job).all()}
            assert all(j.state == JobState.RUNNING and j.attempts == 1 for j in s.query(Job))
        assert len(owners) > 1  # the work was spread, nobody waited on a lock

        # an expired lease is taken over, with the attempt counted
        with db.session() as s:
            s.query(Job).filter(Job.id == ids[0]).update(
                {"lease_expires_at": utcnow() - dt.timedelta(seconds=1)}
            )
        assert claim_job(db, "rescuer", lease_seconds=60, max_attempts=3) == ids[0]
        with db.session() as s:
            job = s.get(Job, ids[0])
            assert job is not None and job.lease_owner == "rescuer" and job.attempts == 2
    finally:
        db.dispose()


def test_processes_starting_together_migrate_once(pg_url: str, tmp_path: Path) -> None:
    """Nodes and workers started at the same moment (systemd at boot) all come up."""
    import subprocess
    import sys

    cfg = write_toml(
        tmp_path / "node.toml",
        {"database": {"url": pg_url}, "spool": {"path": str(tmp_path / "spool")}},
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "db", "upgrade", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)
    db = Database(pg_url)
    try:
        head = db.current_revision()
    finally:
        db.dispose()
    assert head is not None
    assert all(f"to {head}" in out or f"at revision {head}" in out for out in outputs)
