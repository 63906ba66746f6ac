"""Scale-out on a real PostgreSQL server: one SCP node process and separate worker
processes share the database and the spool; DCMTK storescp is the PACS.

- 12 series sent at once through 1 SCP are processed by 3 workers, each exactly once,
  and every result reaches the PACS exactly once.
- A worker SIGKILLed in the middle of a job: after its lease expires another worker
  takes the job over and finishes it; nothing lost, nothing duplicated. A worker stopped
  with SIGTERM finishes its job first.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.db import Database, Delivery, DeliveryState, Job, JobState, Result, Series
from helpers import free_port, port_open, wait_for
from ops.conftest import NodeProcess, base_sections, send_files, write_toml
from ops.synth import write_series
from ops.test_metrics import get, value

pytestmark = pytest.mark.slow

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def cluster_config(
    tmp_path: Path, pg_url: str, checkpoint: Path, pacs_port: int, lease_s: float
) -> tuple[Path, int]:
    port = free_port()
    data = base_sections(
        tmp_path,
        node={"ae_title": "CTMTL", "port": port, "stop_timeout_s": 10},
        database={"url": pg_url},
        spool={"path": str(tmp_path / "shared-spool"), "min_free_mb": 0},
        model={"checkpoint": str(checkpoint), "device": "cpu", "batch_size": 8},
        completion={"idle_seconds": 2.0, "poll_interval_s": 0.2},
        worker={"poll_interval_s": 0.2, "lease_seconds": lease_s, "max_attempts": 3},
        metrics={"enabled": True, "port": free_port()},
    )
    data["allowed_callers"] = [{"ae_title": "MODALITY"}]
    data["destinations"] = [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
    ]
    data["routing"] = {"default": ["pacs"]}
    return write_toml(tmp_path / "node.toml", data), port


def start_scp(node_process: Any, cfg: Path, port: int) -> NodeProcess:
    scp = node_process("serve", "--no-worker", "--config", str(cfg), name="scp")
    wait_for(lambda: port_open(port) or not scp.alive(), 60, "the SCP node to listen")
    assert scp.alive(), scp.log()
    return scp


def start_worker(node_process: Any, cfg: Path, name: str) -> tuple[NodeProcess, str]:
    mport = free_port()
    proc = node_process(
        "worker", "--config", str(cfg), name=name, env={"CTMTL_METRICS__PORT": str(mport)}
    )
    return proc, f"http://127.0.0.1:{mport}"


def wait_ready(proc: NodeProcess, url: str, timeout: float = 120) -> None:
    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"{proc.log_path.name} exited: {proc.log()[-3000:]}")
        try:
            return get(url + "/readyz")[0] == 200
        except OSError:
            return False

    wait_for(ready, timeout, f"{proc.log_path.name} to be ready (model loaded)", step=0.3)


def received(pacs: Any) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.files()]


def source_series(ds: pydicom.Dataset, studies: dict[str, str]) -> str:
    """The CT series a result belongs to (every synthetic series has its own study)."""
    if ds.SOPClassUID == SEG:
        assert str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID) == studies[ds.StudyInstanceUID]
    return studies[str(ds.StudyInstanceUID)]


def all_done(db: Database, n: int) -> bool:
    with db.session() as s:
        done = s.scalars(select(Delivery.id).where(Delivery.state == DeliveryState.DONE)).all()
        return len(done) >= n


def test_one_scp_three_workers_twelve_series(
    pg_url: str, tiny_checkpoint: Path, storescp: Any, node_process: Any, tmp_path: Path
) -> None:
    pacs = storescp("pacs", "PACS")
    cfg, port = cluster_config(tmp_path, pg_url, tiny_checkpoint, pacs.port, lease_s=30)
    scp = start_scp(node_process, cfg, port)
    workers = [start_worker(node_process, cfg, f"worker{i}") for i in range(3)]
    for proc, url in workers:
        wait_ready(proc, url)
        assert "predictor warmed up" in proc.log()  # [model] warm_up, before the first job

    series: dict[str, list[Path]] = {}
    studies: dict[str, str] = {}
    for i in range(12):
        uid, files = write_series(tmp_path / f"in{i}", n_slices=8, size=64, seed=i)
        series[uid] = files
        studies[str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = uid
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda f: send_files(port, f, "MODALITY"), series.values()))
    assert statuses == [[0] * 8] * 12

    db = Database(pg_url)
    try:
        wait_for(lambda: all_done(db, 12), 300, "12 results delivered", step=0.5)
        time.sleep(1.0)  # would-be duplicates get a moment to show up
        with db.session() as s:
            rows = s.scalars(select(Series)).all()
            assert sorted(r.series_instance_uid for r in rows) == sorted(series)
            assert {r.state for r in rows} == {"done"}
            jobs = s.scalars(select(Job)).all()
            assert len(jobs) == 12
            assert all(j.state == JobState.DONE and j.attempts == 1 for j in jobs)
            assert len(s.scalars(select(Result)).all()) == 12
            deliveries = s.scalars(select(Delivery)).all()
            assert len(deliveries) == 12
            assert all(d.state == DeliveryState.DONE and d.attempts == 1 for d in deliveries)
            job_ids = {j.id for j in jobs}
    finally:
        db.dispose()

    # each job was done by exactly one worker, and the work was shared
    done_by: Counter[int] = Counter()
    busy_workers = 0
    for proc, _ in workers:
        mine = {int(m) for m in re.findall(r"job (\d+) done", proc.log())}
        done_by.update(mine)
        busy_workers += bool(mine)
    assert set(done_by) == job_ids and set(done_by.values()) == {1}
    assert busy_workers >= 2

    # the PACS got one SEG and one SR per series, nothing twice
    objects = received(pacs)
    assert len(objects) == 24
    assert len({str(ds.SOPInstanceUID) for ds in objects}) == 24
    kinds = Counter((str(ds.SOPClassUID), source_series(ds, studies)) for ds in objects)
    assert set(kinds.values()) == {1}
    assert {uid for _, uid in kinds} == set(series)
    assert Counter(k for k, _ in kinds) == {SEG: 12, COMPREHENSIVE_3D_SR: 12}

    # logs: lifecycle lines keyed by UIDs, no patient name, ID or accession number
    logs = [scp.log()] + [proc.log() for proc, _ in workers]
    for uid in series:
        assert re.search(rf"series {re.escape(uid)} study \S+ complete", logs[0]), uid
        done = rf"done: series {re.escape(uid)} study \S+ "
        assert sum(bool(re.search(done, log)) for log in logs) == 1
    for text in logs:
        assert "Synthetic" not in text and "OPS-0001" not in text and "ACC000" not in text

    # metrics: the SCP counted what came in, the workers what they processed
    scp_metrics = get(f"http://127.0.0.1:{_metrics_port(cfg)}/metrics")[1]
    assert value(scp_metrics, "ctmtl_instances_received_total") == 96
    assert value(scp_metrics, "ctmtl_associations_total", outcome="accepted") == 12
    processed = sum(
        value(get(url + "/metrics")[1], "ctmtl_series_processed_total") for _, url in workers
    )
    assert processed == 12

    for proc, _ in workers:
        assert proc.stop(60) == 0
    assert scp.stop(60) == 0


def _metrics_port(cfg: Path) -> int:
    from dicom_node.config import load_config

    return load_config(cfg, environ={}).metrics.port


def _job(db: Database) -> Job | None:
    with db.session() as s:
        return s.scalars(select(Job).order_by(Job.id.desc())).first()


def test_killed_worker_job_is_taken_over(
    pg_url: str, tiny_checkpoint: Path, storescp: Any, node_process: Any, tmp_path: Path
) -> None:
    pacs = storescp("pacs", "PACS")
    cfg, port = cluster_config(tmp_path, pg_url, tiny_checkpoint, pacs.port, lease_s=3)
    start_scp(node_process, cfg, port)
    victim, victim_url = start_worker(node_process, cfg, "victim")
    wait_ready(victim, victim_url)

    # big enough that the job runs for seconds on a CPU
    uid, files = write_series(tmp_path / "big", n_slices=24, size=128, seed=7)
    assert send_files(port, files, "MODALITY") == [0] * 24
    db = Database(pg_url)
    try:
        running = wait_for(
            lambda: (j := _job(db)) is not None and j.state == JobState.RUNNING and j,
            60,
            "the job to start",
            step=0.02,
        )
        assert f":{victim.pid}:" in (running.lease_owner or "")
        victim.signal(signal.SIGKILL)
        victim.proc.wait(10)
        job = _job(db)
        assert job is not None and job.state == JobState.RUNNING, "job finished before the kill"
        with db.session() as s:
            assert s.scalars(select(Result)).all() == []

        rescuer, rescuer_url = start_worker(node_process, cfg, "rescuer")
        wait_for(lambda: all_done(db, 1), 180, "the job finished by another worker", step=0.3)
        job = _job(db)
        assert job is not None
        assert job.state == JobState.DONE and job.attempts == 2
        with db.session() as s:
            assert len(s.scalars(select(Result)).all()) == 1
            assert len(s.scalars(select(Job)).all()) == 1
        assert "taken over by" in rescuer.log()
        time.sleep(1.0)
        objects = received(pacs)
        assert sorted(str(ds.SOPClassUID) for ds in objects) == [SEG, COMPREHENSIVE_3D_SR]
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert {source_series(ds, {study: uid}) for ds in objects} == {uid}

        # SIGTERM in the middle of a job: the worker finishes it, then exits cleanly
        wait_ready(rescuer, rescuer_url)
        _, files2 = write_series(tmp_path / "big2", n_slices=24, size=128, seed=8)
        assert send_files(port, files2, "MODALITY") == [0] * 24
        wait_for(
            lambda: (j := _job(db)) is not None and j.id != job.id and j.state == JobState.RUNNING,
            60,
            "the second job to start",
            step=0.02,
        )
        assert rescuer.stop(120) == 0
        second = _job(db)
        assert second is not None and second.state == JobState.DONE and second.attempts == 1
        wait_for(lambda: all_done(db, 2), 60, "the second result delivered (by the SCP node)")
        assert len(pacs.files()) == 4
    finally:
        db.dispose()
