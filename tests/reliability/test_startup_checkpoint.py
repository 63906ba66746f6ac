"""Issue 13.6: a node whose model checkpoint is missing or broken refuses to start (exit 2,
one line naming the file and the cause) instead of answering Success to every C-STORE and
failing every job; `config check` says so too; queued work is left for a worker that can
do it, and a job an older version failed for want of the model can be retried.

Real parts only: the `ctmtl-node` process, real checkpoint files (a tiny real one, and
missing / random / truncated copies), a real SQLite file and spool.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from ops import conftest as ops_fixtures
from ops.conftest import NodeProcess, base_sections, send_files, write_toml
from ops.synth import write_series
from sqlalchemy import select, update

from dicom_node.db import Database, Job, JobState, Series, SeriesState
from helpers import free_port, port_open, wait_for
from reliability.nodes import run_node

node_process = ops_fixtures.node_process  # the fixture: node processes, stopped at teardown


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def bad_checkpoint(kind: str, tiny_checkpoint: Path, folder: Path) -> Path:
    path = folder / f"{kind}.safetensors"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":  # the header is intact, the weights are cut off
        data = tiny_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    return path  # "missing": never written


CAUSES = {
    "missing": "does not exist",
    "random": "not a readable safetensors file",
    "truncated": "not a readable safetensors file",
    "empty": "not a readable safetensors file",
}


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize("kind", sorted(CAUSES))
def test_node_with_a_broken_checkpoint_refuses_to_start(
    tmp_path: Path, tiny_checkpoint: Path, command: str, kind: str
) -> None:
    ckpt = bad_checkpoint(kind, tiny_checkpoint, tmp_path)
    port = free_port()
    data = base_sections(
        tmp_path, node={"port": port}, model={"checkpoint": str(ckpt), "device": "cpu"}
    )
    cfg = write_toml(tmp_path / "node.toml", data)
    proc = run_node(command, "--config", str(cfg))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, out
    assert errors[0].startswith("error: model.checkpoint: "), errors
    assert str(ckpt) in errors[0] and CAUSES[kind] in errors[0], errors
    assert "listening" not in out and " started" not in out
    assert not port_open(port)
    # nothing was made for work the node cannot do: no database, no spool folders
    assert not (tmp_path / "spool" / "incoming").exists()


@pytest.mark.parametrize("kind", ["missing", "random", "truncated"])
def test_config_check_reports_a_broken_checkpoint(
    tmp_path: Path, tiny_checkpoint: Path, kind: str
) -> None:
    ckpt = bad_checkpoint(kind, tiny_checkpoint, tmp_path)
    data = base_sections(tmp_path, model={"checkpoint": str(ckpt)})
    cfg = write_toml(tmp_path / "node.toml", data)
    proc = run_node("config", "check", str(cfg))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = [line.strip() for line in proc.stderr.splitlines()]
    assert any(
        line.startswith("model.checkpoint:") and str(ckpt) in line and CAUSES[kind] in line
        for line in lines
    ), proc.stderr


def test_config_check_reports_a_missing_shipped_checkpoint_only_for_a_worker(
    tmp_path: Path,
) -> None:
    """No `model.checkpoint`: the shipped one (here: env CTMTL_CHECKPOINT) is needed only
    where a worker runs; an SCP-only node's check passes without it."""
    absent = tmp_path / "not-shipped.safetensors"
    env = {"CTMTL_CHECKPOINT": str(absent)}
    data = base_sections(tmp_path, worker={"enabled": True})
    proc = run_node("config", "check", str(write_toml(tmp_path / "w.toml", data)), env=env)
    assert proc.returncode == 2 and str(absent) in proc.stderr, proc.stderr
    assert "shipped checkpoint" in proc.stderr
    data = base_sections(tmp_path, worker={"enabled": False})
    proc = run_node("config", "check", "-q", str(write_toml(tmp_path / "s.toml", data)), env=env)
    assert proc.returncode == 0, proc.stderr


def _jobs(db: Database) -> list[tuple[int, str, int]]:
    with db.session() as s:
        return [(j.id, j.state, j.attempts) for j in s.scalars(select(Job).order_by(Job.id))]


def _fail_as_an_older_version_did(db: Database, job_id: int, error: str) -> None:
    """The rows an older version left: job failed for good after its attempts, series too."""
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.attempts, job.error = JobState.FAILED, 3, error
        s.execute(
            update(Series)
            .where(Series.id == job.series_id)
            .values(state=SeriesState.FAILED, reason=f"processing failed: {error}")
        )


def _series_state(db: Database, uid: str) -> str:
    with db.session() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        return series.state


@pytest.mark.slow
def test_queued_work_waits_for_a_worker_that_can_do_it_and_failed_jobs_retry(
    tmp_path: Path, tiny_checkpoint: Path, node_process: Callable[..., NodeProcess]
) -> None:
    port = free_port()
    data = base_sections(
        tmp_path,
        node={"port": port},
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu", "precision": "fp32"},
        export={"enabled": False},
        metrics={"enabled": False},
    )
    cfg = write_toml(tmp_path / "node.toml", data)
    db = Database(f"sqlite:///{tmp_path / 'spool' / 'ctmtl-node.db'}")

    # an SCP-only node receives two series and queues their jobs
    scp = node_process("serve", "--no-worker", "--config", str(cfg), name="scp")
    wait_for(lambda: port_open(port) or not scp.alive(), 60, "the SCP to listen")
    uids = []
    for seed in (3, 4):
        uid, files = write_series(tmp_path / f"series{seed}", n_slices=8, size=64, seed=seed)
        assert send_files(port, files, "MODALITY") == [0] * 8
        uids.append(uid)
    wait_for(lambda: len(_jobs(db)) == 2, 60, "both series to be queued")
    assert scp.stop(30) == 0
    (job_a, *_), (job_b, *_) = jobs = _jobs(db)
    assert [j[1:] for j in jobs] == [(JobState.QUEUED, 0)] * 2

    # a worker without its model refuses to start and leaves the jobs alone
    gone = tmp_path / "gone.safetensors"
    proc = run_node("worker", "--config", str(cfg), env={"CTMTL_MODEL__CHECKPOINT": str(gone)})
    assert proc.returncode == 2 and str(gone) in proc.stderr, proc.stderr
    assert _jobs(db) == jobs

    # the jobs as an older version left them: one failed because the model was missing
    _fail_as_an_older_version_did(db, job_a, f"CheckpointError: checkpoint {gone}: file not found")
    _fail_as_an_older_version_did(db, job_b, "RuntimeError: something else")
    proc = run_node(
        "retry", "--failed", "--error-contains", "checkpointerror", "--config", str(cfg)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"job {job_b + 1} queued (retry of job {job_a})"]

    # a worker with its model does the retried job; the other one waits for its own retry
    worker = node_process("worker", "--config", str(cfg), name="worker")
    for uid in uids:

        def done(uid: str = uid) -> bool:
            return _series_state(db, uid) == SeriesState.DONE or not worker.alive()

        if uid == uids[1]:
            assert _series_state(db, uid) == SeriesState.FAILED
            proc = run_node("retry", str(job_b), "--config", str(cfg))
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip() == f"job {job_b + 2} queued (retry of job {job_b})"
        wait_for(done, 240, f"the retried job of {uid} to be done", step=0.5)
        assert worker.alive(), worker.log()
    assert _jobs(db) == [
        (job_a, JobState.FAILED, 3),
        (job_b, JobState.FAILED, 3),
        (job_b + 1, JobState.DONE, 1),
        (job_b + 2, JobState.DONE, 1),
    ]
    proc = run_node("retry", "--failed", "--config", str(cfg))
    assert proc.returncode == 0 and proc.stdout.strip() == "no failed job to retry"
    proc = run_node("retry", "--config", str(cfg))  # neither a JOB nor --failed
    assert proc.returncode == 2 and "give a JOB, or --failed" in proc.stderr
    db.dispose()
    assert worker.stop(60) == 0
