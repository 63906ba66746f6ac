"""Scale-out faults of issue 16 against real parts: a worker that lost its job lease, and
two `ctmtl-node db upgrade` runs at once.

- Lease lost (item 7): a real worker process is frozen with SIGSTOP in the middle of a job
  on the real non-COVID series; its lease runs out on the real PostgreSQL server, a second
  worker process takes the job over and finishes it. Thawed with SIGCONT, the first worker
  notices at its next stage boundary, logs "lease lost to another worker, stopping after
  stage X", removes its attempt folder and records and sends nothing: one result, one
  delivery per destination, the PACS gets one SEG and one SR, and the spool holds no
  result folder but the winner's.
- Concurrent upgrades (item 10): the test holds the upgrade lock (PostgreSQL advisory lock;
  SQLite write lock) while two real `ctmtl-node db upgrade` processes start, so both are
  waiting at once; released, exactly one reports "upgraded from empty" and the other
  "already at revision".
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from ops.conftest import NodeProcess, base_sections, send_files, write_toml
from ops.conftest import node_process as node_process
from ops.conftest import pg_url as pg_url
from ops.conftest import postgres as postgres
from ops.test_metrics import get
from sqlalchemy import select, text

from dicom_node.db import (
    UPGRADE_LOCK_KEY,
    Database,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
)
from helpers import NODE_CLI, REPO, free_port, port_open, wait_for

pytestmark = pytest.mark.slow

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
LEASE_S = 3.0

# --------------------------------------------------------------------------- lease lost


def cluster_config(
    tmp_path: Path, pg_url: str, checkpoint: Path, pacs_port: int
) -> tuple[Path, int, Path]:
    """One SCP node and workers on one PostgreSQL database and one spool; short leases."""
    port = free_port()
    spool = tmp_path / "shared-spool"
    data = base_sections(
        tmp_path,
        node={"ae_title": "CTMTL", "port": port, "stop_timeout_s": 10},
        database={"url": pg_url},
        spool={"path": str(spool), "min_free_mb": 0},
        model={"checkpoint": str(checkpoint), "device": "cpu", "batch_size": 8},
        completion={"idle_seconds": 1.0, "poll_interval_s": 0.2},
        worker={"poll_interval_s": 0.2, "lease_seconds": LEASE_S, "max_attempts": 3},
        metrics={"enabled": True, "port": free_port()},
    )
    data["allowed_callers"] = [{"ae_title": "MODALITY"}]
    data["destinations"] = [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
    ]
    data["routing"] = {"default": ["pacs"]}
    return write_toml(tmp_path / "node.toml", data), port, spool


def start_worker(node_process: Any, cfg: Path, name: str) -> NodeProcess:
    """A `ctmtl-node worker` process, waited for until its model is loaded (/readyz)."""
    mport = free_port()
    proc: NodeProcess = node_process(
        "worker", "--config", str(cfg), name=name, env={"CTMTL_METRICS__PORT": str(mport)}
    )

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"{name} exited: {proc.log()[-3000:]}")
        try:
            return get(f"http://127.0.0.1:{mport}/readyz")[0] == 200
        except OSError:
            return False

    wait_for(ready, 180, f"{name} to be ready (model loaded)", step=0.3)
    return proc


def _job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def freeze(proc: NodeProcess, db: Database) -> None:
    """SIGSTOP `proc`, but never while it holds a transaction open (a frozen transaction
    would keep the job row locked, and the other worker would skip it forever)."""
    stuck_sql = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state LIKE 'idle in transaction%' AND state_change < now() - interval '0.4 s'"
    )
    for _ in range(20):
        proc.signal(signal.SIGSTOP)
        time.sleep(0.6)
        with db.engine.connect() as conn:
            if not conn.execute(stuck_sql).scalar():
                return
        proc.signal(signal.SIGCONT)
        time.sleep(0.05)
    pytest.fail("the worker was always frozen inside a transaction")


def all_delivered(db: Database, n: int) -> bool:
    with db.session() as s:
        states = s.scalars(select(Delivery.state)).all()
        return len(states) >= n and all(st == DeliveryState.DONE for st in states)


def test_a_worker_that_lost_its_lease_stops_and_leaves_nothing_behind(
    pg_url: str,
    tiny_checkpoint: Path,
    noncovid_files: list[Path],
    storescp: Any,
    node_process: Any,
    tmp_path: Path,
) -> None:
    pacs = storescp("pacs", "PACS")
    cfg, port, spool = cluster_config(tmp_path, pg_url, tiny_checkpoint, pacs.port)
    scp = node_process("serve", "--no-worker", "--config", str(cfg), name="scp")
    wait_for(lambda: port_open(port) or not scp.alive(), 60, "the SCP node to listen")
    assert scp.alive(), scp.log()
    first = start_worker(node_process, cfg, "first")

    assert send_files(port, noncovid_files, "MODALITY") == [0] * len(noncovid_files)
    found = wait_for(
        lambda: re.search(r"job (\d+) started \(attempt 1\)", first.log()),
        120,
        "the first worker to start the job",
        step=0.01,
    )
    job_id = int(found.group(1))
    db = Database(pg_url)
    try:
        freeze(first, db)
        try:
            job = _job(db, job_id)
            assert job.state == JobState.RUNNING, "the job finished before the freeze"
            assert f":{first.pid}:" in (job.lease_owner or "")
            with db.session() as s:
                assert s.scalars(select(Result)).all() == []

            # frozen for longer than its lease: the second worker takes the job over
            second = start_worker(node_process, cfg, "second")
            wait_for(lambda: all_delivered(db, 1), 180, "the job done and delivered by the second")
            assert re.search(rf"job {job_id}: lease of \S+:{first.pid}:\S+ expired", second.log())
            assert re.search(rf"job {job_id} done: ", second.log())
        finally:
            first.signal(signal.SIGCONT)

        lost = wait_for(
            lambda: re.search(
                rf"job {job_id}: lease lost to another worker, stopping after stage (\w+)",
                first.log(),
            ),
            120,
            "the first worker to notice it lost the lease",
            step=0.2,
        )
        assert lost.group(1) in ("claim", "load", "inference", "write"), lost.group(0)
        time.sleep(2.0)  # whatever the first worker would still do gets time to show up
        assert first.alive() and second.alive()
        assert not re.search(rf"job {job_id} done", first.log())

        # one result, one delivery, by the second worker's attempt
        with db.session() as s:
            jobs = s.scalars(select(Job)).all()
            assert [(j.id, j.state, j.attempts) for j in jobs] == [(job_id, JobState.DONE, 2)]
            results = s.scalars(select(Result)).all()
            assert len(results) == 1
            result = results[0]
            deliveries = s.scalars(select(Delivery)).all()
            assert [(d.result_id, d.destination, d.state, d.attempts) for d in deliveries] == [
                (result.id, "pacs", DeliveryState.DONE, 1)
            ]
        seg, sr = Path(result.seg_path), Path(result.sr_path)
        assert seg.is_file() and sr.is_file()
        assert seg.parent.name == "attempt-2" and seg.parent.parent.name == f"job-{job_id}"

        # the spool holds the winner's two files and nothing else (no orphan folder)
        left = sorted(p for p in (spool / "results").rglob("*") if p.is_file())
        assert left == sorted([seg, sr])
        folders = sorted(p for p in (spool / "results").rglob("*") if p.is_dir())
        assert folders == [seg.parent.parent.parent, seg.parent.parent, seg.parent]

        # the PACS got exactly that SEG and SR, once
        objects = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.files()]
        assert sorted((str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in objects) == sorted(
            [
                (SEG, result.seg_sop_instance_uid),
                (COMPREHENSIVE_3D_SR, result.sr_sop_instance_uid),
            ]
        )
    finally:
        db.dispose()
    assert first.stop(60) == 0
    assert second.stop(60) == 0
    assert scp.stop(60) == 0


# --------------------------------------------------------------------------- db upgrade


def start_upgrades(cfg: Path, n: int = 2) -> list[subprocess.Popen[str]]:
    cmd = [*NODE_CLI, "db", "upgrade", "--config", str(cfg)]
    return [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(n)
    ]


def finish(procs: Sequence[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        out.append((proc.returncode, stdout, stderr))
    return out


def assert_one_upgrade(outcomes: list[tuple[int, str, str]], head: str) -> None:
    assert [rc for rc, _, _ in outcomes] == [0, 0], outcomes
    stdouts = [stdout for _, stdout, _ in outcomes]
    upgraded = [s for s in stdouts if f"upgraded from empty to {head}" in s]
    already = [s for s in stdouts if f"already at revision {head}" in s]
    assert len(upgraded) == 1 and len(already) == 1, stdouts


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from dicom_node.db import alembic_config

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def test_two_db_upgrades_at_once_on_postgresql_report_one_upgrade(
    pg_url: str,
    tmp_path: Path,
) -> None:
    cfg = write_toml(
        tmp_path / "node.toml",
        {"database": {"url": pg_url}, "spool": {"path": str(tmp_path / "spool")}},
    )
    waiting_sql = text(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE d.datname = current_database() AND l.locktype = 'advisory' "
        "AND l.objid = :key AND NOT l.granted"
    )
    db = Database(pg_url)
    try:
        with db.engine.connect() as holder:  # both runs queue behind the test's lock
            holder.exec_driver_sql(f"SELECT pg_advisory_lock({UPGRADE_LOCK_KEY})")
            holder.commit()
            procs = start_upgrades(cfg)
            try:
                with db.engine.connect() as probe:
                    wait_for(
                        lambda: probe.execute(waiting_sql, {"key": UPGRADE_LOCK_KEY}).scalar() == 2,
                        120,
                        "both upgrades to wait for the upgrade lock",
                        step=0.1,
                    )
            finally:
                holder.exec_driver_sql(f"SELECT pg_advisory_unlock({UPGRADE_LOCK_KEY})")
                holder.commit()
            outcomes = finish(procs)
        head = head_revision()
        assert_one_upgrade(outcomes, head)
        assert db.current_revision() == head
    finally:
        db.dispose()


def _sleeping_in_sqlite(pid: int) -> bool:
    """The process sleeps (SQLite's busy handler retrying the locked database)."""
    try:
        return "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


def test_two_db_upgrades_at_once_on_sqlite_report_one_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "var" / "ctmtl.db"
    path.parent.mkdir()
    cfg = write_toml(
        tmp_path / "node.toml",
        {"database": {"url": f"sqlite:///{path}"}, "spool": {"path": str(tmp_path / "spool")}},
    )
    holder = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        holder.execute("PRAGMA journal_mode = WAL")  # as the node opens it
        holder.execute("BEGIN IMMEDIATE")  # the write lock every node transaction takes
        procs = start_upgrades(cfg)
        try:
            steady = 0

            def both_waiting() -> bool:
                nonlocal steady
                ok = all(_sleeping_in_sqlite(p.pid) for p in procs)
                steady = steady + 1 if ok else 0
                return steady >= 5

            wait_for(both_waiting, 25, "both upgrades to wait for the write lock", step=0.1)
        finally:
            holder.execute("ROLLBACK")
        outcomes = finish(procs)
    finally:
        holder.close()
    head = head_revision()
    assert_one_upgrade(outcomes, head)
    db = Database(f"sqlite:///{path}")
    try:
        assert db.current_revision() == head
    finally:
        db.dispose()
