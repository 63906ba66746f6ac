"""Issue 13.8: a full disk while results are written (spool free-space guard off).

A real node process writes its results onto a tiny tmpfs mounted at `spool/results` and
filled to the last byte. The worker must hand the job back without using up an attempt,
log "cannot write results: disk full" once (no traceback every second), back off, report
the fault in /readyz and the metrics, and once space returns log "results can be written
again" once and deliver the results."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ops.conftest import NodeProcess, send_files
from ops.synth import write_series

from dicom_node.cli import main
from helpers import port_open, wait_for
from reliability.nodes import lines, log_growth, metric, node_config, node_processes, readyz

pytestmark = pytest.mark.slow


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    with node_processes(tmp_path) as start:
        yield start


FULL = "cannot write results: disk full"
BACK = "results can be written again"


@pytest.fixture
def tiny_fs() -> Iterator[Callable[[Path], Path]]:
    """Mount a 1 MiB tmpfs at a folder (root only); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(at: Path) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        at.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "ctmtl-full", str(at)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(at)
        return at

    yield mount
    for at in reversed(mounted):
        subprocess.run(["umount", "-l", str(at)], check=False)


def fill(folder: Path) -> Path:
    """Write a file into `folder` until the file system has no byte left."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (b"\xff" * 65536, b"\xff" * 4096, b"\xff"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def status(cfg: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(cfg)]) == 0
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return rows


def test_disk_full_is_logged_once_and_the_job_waits_for_space(
    node_process: Callable[..., Any],
    storescp: Callable[..., Any],
    tiny_checkpoint: Path,
    tiny_fs: Callable[[Path], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pacs = storescp("pacs", "PACS")
    cfg, port, url = node_config(
        tmp_path,
        tiny_checkpoint,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        routing={"default": ["pacs"]},
        worker={"max_attempts": 2},
    )
    results = tiny_fs(tmp_path / "spool" / "results")
    filler = fill(results)
    node = node_process("serve", "--config", str(cfg))
    wait_for(lambda: port_open(port), 120, "the node listening")
    uid, files = write_series(tmp_path / "in", n_slices=8, size=64)
    assert send_files(port, files, "MODALITY") == [0] * 8

    wait_for(lambda: lines(node.log(), FULL), 120, "the full disk to be noticed")
    quiet = log_growth(node.log, 6.0)  # backing off, not a traceback every second
    assert len(quiet) <= 2, quiet
    log = node.log()
    assert len(lines(log, FULL)) == 1
    assert "Traceback" not in log and "failed for good" not in log
    (row,) = status(cfg, capsys)
    assert row["series_instance_uid"] == uid and row["state"] == "queued"
    assert "disk full" in (row["reason"] or "")
    (job,) = row["jobs"]
    assert job["state"] == "queued" and job["attempts"] == 0  # the series is not to blame
    assert (job["error"] or "").startswith("waiting for disk space: OSError: [Errno 28]")
    code, body = readyz(url)
    assert code == 503 and FULL in json.loads(body)["checks"]["faults"]["detail"]
    assert metric(url, "ctmtl_disk_full_total") == 1
    assert metric(url, "ctmtl_fault_active", fault="disk_full") == 1
    assert pacs.files() == []

    filler.unlink()  # space is back
    wait_for(lambda: len(pacs.files()) == 2, 120, "SEG and SR at the PACS")
    wait_for(lambda: lines(node.log(), BACK), 30, "the recovery line")
    log = node.log()
    assert len(lines(log, FULL)) == 1 and len(lines(log, BACK)) == 1
    assert "Traceback" not in log
    wait_for(lambda: readyz(url)[0] == 200, 30, "ready again")
    assert metric(url, "ctmtl_fault_active", fault="disk_full") == 0
    wait_for(  # the PACS has the files a moment before the exporter records the delivery
        lambda: status(cfg, capsys)[0]["jobs"][0]["deliveries"][0]["state"] == "done",
        30,
        "the delivery to be recorded",
    )
    (row,) = status(cfg, capsys)
    assert row["state"] == "done" and row["reason"] is None
    (job,) = row["jobs"]
    assert job["state"] == "done" and job["attempts"] == 1 and job["error"] is None
    assert [d["state"] for d in job["deliveries"]] == ["done"]
    assert not list(results.glob("**/.space-probe.*"))
