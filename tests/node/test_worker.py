"""Worker: jobs to results to deliveries; rejections, retries, crash recovery, replacement."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.config import NodeConfig, StartupError
from dicom_node.db import (
    Database,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
)
from dicom_node.service import NodeService
from dicom_node.worker import build_predictor
from helpers import NODE_CLI, StoreSCP, free_port, wait_for

from .conftest import derive_series, store_files


def _model(ckpt: Path) -> dict[str, object]:
    return {"checkpoint": str(ckpt), "device": "cpu", "precision": "fp32", "batch_size": 8}


def _series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _state(db: Database, uid: str) -> tuple[str, str | None, list[Job]]:
    with db.session() as s:
        se = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        jobs = list(s.scalars(select(Job).where(Job.series_id == se.id).order_by(Job.id)))
        return se.state, se.reason, jobs


@pytest.mark.slow
def test_series_processed_delivered_and_replaced(
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    storescp: Callable[..., StoreSCP],
    tiny_checkpoint: Path,
    noncovid_files: list[Path],
    tmp_path: Path,
) -> None:
    pacs = storescp("pacs", "PACS")
    cfg = make_config(
        model=_model(tiny_checkpoint),
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    node = start_node(cfg)
    files = derive_series(noncovid_files, tmp_path / "series")
    uid = _series_uid(files)
    assert set(store_files(node.port, files, calling_ae="PACS")) == {0}

    def delivered(n: int) -> bool:
        with node.db.session() as s:
            return (
                len(s.scalars(select(Delivery).where(Delivery.state == DeliveryState.DONE)).all())
                == n
            )

    wait_for(lambda: delivered(1), 120, "first result delivered")
    state, reason, jobs = _state(node.db, uid)
    assert state == SeriesState.DONE and reason is None
    assert [j.state for j in jobs] == [JobState.DONE]
    assert {"load", "lung_mask", "inference", "seg", "sr", "total", "queue_wait"} <= set(
        jobs[0].timings or {}
    )
    first = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in pacs.files()}
    assert len(first) == 2

    # a changed instance arrives later: a new job, results in the same two series
    changed = pydicom.dcmread(files[5])
    changed.SeriesDescription = "ThoraxRoutine corrected"
    changed.save_as(files[5])
    assert store_files(node.port, [files[5]], calling_ae="PACS") == [0]
    wait_for(lambda: delivered(2), 120, "second result delivered")
    state, _, jobs = _state(node.db, uid)
    assert state == SeriesState.DONE and [j.state for j in jobs] == [JobState.DONE] * 2
    with node.db.session() as s:
        results = list(s.scalars(select(Result).order_by(Result.id)))
    assert [r.superseded for r in results] == [True, False]
    assert results[0].seg_series_uid == results[1].seg_series_uid
    assert results[0].sr_series_uid == results[1].sr_series_uid
    assert results[0].seg_sop_instance_uid != results[1].seg_sop_instance_uid
    received = [pydicom.dcmread(f) for f in pacs.files()]
    assert len(received) == 4
    assert len({ds.SeriesInstanceUID for ds in received}) == 2  # one SEG, one SR series
    newest = {ds.Modality: ds for ds in received if ds.SOPInstanceUID not in first}
    assert int(newest["SEG"].InstanceNumber) == 2 and int(newest["SR"].InstanceNumber) == 2


def _water(ds: Dataset, _i: int) -> None:
    """A phantom of water: CT that passes the rules but has no lungs."""
    arr = np.full((int(ds.Rows), int(ds.Columns)), 1024, dtype=np.int16)
    ds.PixelData = arr.tobytes()


@pytest.mark.slow
def test_pipeline_rejection_and_failure_are_stored(
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    tiny_checkpoint: Path,
    noncovid_files: list[Path],
    tmp_path: Path,
) -> None:
    cfg = make_config(model=_model(tiny_checkpoint), export={"enabled": False})
    node = start_node(cfg)
    water = derive_series(noncovid_files, tmp_path / "water", _water)
    store_files(node.port, water)
    uid = _series_uid(water)
    wait_for(lambda: _state(node.db, uid)[0] == SeriesState.REJECTED, 60, "rejection")
    _, reason, jobs = _state(node.db, uid)
    assert "no lungs found" in (reason or "")
    assert [(j.state, j.attempts) for j in jobs] == [(JobState.REJECTED, 1)]
    with node.db.session() as s:
        assert s.scalars(select(Result)).all() == []


@pytest.mark.slow
def test_unusable_model_fails_after_retries(
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    noncovid_files: list[Path],
    tmp_path: Path,
) -> None:
    cfg = make_config(
        model={"checkpoint": str(tmp_path / "missing.safetensors"), "device": "cpu"},
        worker={"max_attempts": 2, "retry_delay_s": 0.2},
    )
    refused = NodeService(cfg)
    with pytest.raises(StartupError, match=r"model\.checkpoint: .*missing\.safetensors"):
        refused.start()  # the node checks and loads its model before accepting anything
    refused.stop()
    # a model that fails to load only when a job runs (a custom factory) is retried per job
    node = start_node(cfg, predictor_factory=lambda: build_predictor(cfg))
    files = derive_series(noncovid_files, tmp_path / "s")
    store_files(node.port, files)
    uid = _series_uid(files)
    wait_for(lambda: _state(node.db, uid)[0] == SeriesState.FAILED, 60, "failure")
    _, reason, jobs = _state(node.db, uid)
    assert [(j.state, j.attempts) for j in jobs] == [(JobState.FAILED, 2)]
    assert "CheckpointError" in (jobs[0].error or "") and "processing failed" in (reason or "")


@pytest.mark.slow
def test_job_of_a_killed_node_is_finished_after_restart(
    tiny_checkpoint: Path,
    noncovid_files: list[Path],
    tmp_path: Path,
) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[node]
port = {port}
[spool]
path = "var"
min_free_mb = 0
[completion]
idle_seconds = 0.5
poll_interval_s = 0.2
[worker]
lease_seconds = 4
poll_interval_s = 0.2
[export]
enabled = false
[model]
checkpoint = "{tiny_checkpoint}"
device = "cpu"
precision = "fp32"
"""
    )
    env = {**os.environ, "CTMTL_NODE__AE_TITLE": "CTMTL"}
    cmd = [*NODE_CLI, "serve", "--config", str(config)]

    def start(log: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / log).open("wb")
        )
        wait_for(lambda: proc.poll() is None and _listening(port), 60, "node listening")
        return proc

    db = Database(f"sqlite:///{tmp_path / 'var' / 'ctmtl-node.db'}")
    first = start("first.log")
    try:
        files = derive_series(noncovid_files, tmp_path / "s")
        store_files(port, files)
        uid = _series_uid(files)
        wait_for(
            lambda: any(j.state == JobState.RUNNING for j in _state(db, uid)[2]), 60, "job running"
        )
        first.send_signal(signal.SIGKILL)  # crash mid-job
        first.wait(10)
        _, _, jobs = _state(db, uid)
        assert [j.state for j in jobs] == [JobState.RUNNING]  # left behind by the crash
        second = start("second.log")
        try:
            wait_for(lambda: _state(db, uid)[0] == SeriesState.DONE, 120, "job finished")
            _, _, jobs = _state(db, uid)
            assert [(j.state, j.attempts) for j in jobs] == [(JobState.DONE, 2)]
            second.send_signal(signal.SIGTERM)  # clean stop
            assert second.wait(60) == 0
        finally:
            if second.poll() is None:
                second.kill()
        log = (tmp_path / "second.log").read_text()
        assert "lease of" in log and "taken over" in log
        assert "node stopped" in log
    finally:
        if first.poll() is None:
            first.kill()
        db.dispose()


def _listening(port: int) -> bool:
    """C-ECHO, not a bare TCP connect (that would hold an idle association open)."""
    from dicom_node.export import Peer, echo

    return echo(Peer("CTMTL", "127.0.0.1", port, "TESTSCU", 5))[0]


def test_status_reads_what_happened(tmp_path: Path) -> None:
    """`ctmtl-node status` on an empty node database."""
    config = tmp_path / "node.toml"
    config.write_text('[spool]\npath = "var"\n')
    out = subprocess.run(
        [*NODE_CLI, "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "no series received yet" in out.stdout
    _ = time
