"""Issue 13.13 (part): the CLI against a closed pipe and a peer that refuses connections.

`ctmtl-node status | head` exits quietly (no BrokenPipeError traceback); `echo` to a port
where nothing listens says "connection refused (host:port)", not "aborted or no answer",
which stays for a peer that accepts the connection and never answers."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from ops.conftest import base_sections, write_toml

from dicom_node.db import Database, Series, SeriesState, Study
from helpers import NODE_CLI, REPO, StoreSCP, free_port


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NODE_CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture
def many_series(tmp_path: Path) -> Path:
    """A node config whose SQLite database lists 1,500 series (status output > a pipe)."""
    cfg = write_toml(tmp_path / "node.toml", base_sections(tmp_path))
    from dicom_node.config import load_config

    db = Database(load_config(cfg, environ={}).database_url)
    try:
        db.upgrade()
        with db.session() as s:
            study = Study(study_instance_uid="1.2.826.0.1.3680043.8.498.7")
            s.add(study)
            s.flush()
            s.add_all(
                Series(
                    study_id=study.id,
                    series_instance_uid=f"1.2.826.0.1.3680043.8.498.7.{i}",
                    state=SeriesState.REJECTED,
                    reason="not a chest CT: the body part examined is HEAD",
                    calling_ae="MODALITY",
                    n_instances=100,
                )
                for i in range(1500)
            )
    finally:
        db.dispose()
    return cfg


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["text", "json"])
def test_status_into_a_closed_pipe_exits_quietly(many_series: Path, extra: list[str]) -> None:
    status = shlex.join([*NODE_CLI, "status", "--limit", "1500", "--config", str(many_series)])
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {status} {shlex.join(extra)} | head -n 2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert len(proc.stdout.splitlines()) == 2
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback, nothing at exit
    assert proc.returncode == 141  # as a command cut short by SIGPIPE


def test_echo_says_connection_refused(storescp: Callable[..., StoreSCP], silent_peer: int) -> None:
    port = free_port()  # nothing listens there
    proc = _cli("echo", f"PACS@127.0.0.1:{port}", "--timeout", "5")
    assert proc.returncode == 1
    assert f"connection refused (127.0.0.1:{port})" in proc.stdout, proc.stdout
    assert "aborted or no answer" not in proc.stdout
    assert "TCP Initialisation Error" not in proc.stderr, proc.stderr  # one line, the cause

    proc = _cli("echo", f"PACS@127.0.0.1:{silent_peer}", "--timeout", "2")
    assert proc.returncode == 1
    assert "aborted or no answer" in proc.stdout, proc.stdout

    pacs = storescp("echo", "PACS")
    proc = _cli("echo", f"PACS@127.0.0.1:{pacs.port}")
    assert proc.returncode == 0 and "success" in proc.stdout, proc.stdout + proc.stderr
