"""Helpers for the reliability tests that run a real node process: its config file, its
log read line by line, its metrics and /readyz, and a DCMTK storescp on a chosen port."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ops.conftest import NodeProcess, base_sections, write_toml
from ops.test_metrics import get, value

from dicom_node.config import merge_tables
from helpers import NODE_CLI, REPO, dcmtk_tool, free_port, port_open, stop_process, wait_for


def run_node(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ctmtl-node ARGS` to the end (one thread for torch): its exit code, stdout and stderr."""
    return subprocess.run(
        [*NODE_CLI, *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def node_config(tmp_path: Path, checkpoint: Path | None, **sections: Any) -> tuple[Path, int, str]:
    """A node config file for `ctmtl-node serve`: free ports, tiny model, fast backoff.

    Returns (config path, DICOM port, metrics URL).
    """
    port, metrics_port = free_port(), free_port()
    ours: dict[str, Any] = {
        "node": {"port": port},
        "model": {"device": "cpu", "precision": "fp32"},
        "metrics": {"enabled": True, "port": metrics_port},
        "backoff": {"initial_s": 0.2, "max_s": 1.0},
    }
    if checkpoint is not None:
        ours["model"]["checkpoint"] = str(checkpoint)
    data = base_sections(tmp_path, **merge_tables(ours, sections))
    path = write_toml(tmp_path / "node.toml", data)
    return path, port, f"http://127.0.0.1:{metrics_port}"


def lines(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


def log_growth(read: Any, seconds: float) -> list[str]:
    """The lines a log (`read()` -> its whole text) gains over `seconds`."""
    before = len(read().splitlines())
    time.sleep(seconds)
    return read().splitlines()[before:]


def metric(url: str, name: str, **labels: str) -> float:
    return value(get(url + "/metrics")[1], name, **labels)


def readyz(url: str) -> tuple[int, str]:
    return get(url + "/readyz")


def ready(url: str) -> bool:
    """/readyz answers 200. False while nothing listens there yet: a starting node binds its
    DICOM port first and its health endpoint a moment later."""
    try:
        return readyz(url)[0] == 200
    except urllib.error.URLError:
        return False


class StoreSCPOn:
    """DCMTK storescp on a given port (a destination that comes back where it was)."""

    def __init__(self, folder: Path, port: int, ae_title: str = "PACS") -> None:
        self.folder, self.port = folder, port
        folder.mkdir(parents=True, exist_ok=True)
        self._log = (folder.parent / f"{folder.name}.log").open("w")
        self.proc = subprocess.Popen(
            [dcmtk_tool("storescp"), "--aetitle", ae_title, "--output-directory", str(folder),
             "--accept-all", "--unique-filenames", str(port)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(lambda: port_open(port), 20, f"storescp on port {port}")

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self._log.close()


@contextlib.contextmanager
def node_processes(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """`start(*args, name=...)` runs `ctmtl-node ARGS`; every process is stopped at the end."""
    started: list[NodeProcess] = []

    def start(*args: str, name: str = "node") -> NodeProcess:
        proc = NodeProcess(args, tmp_path / f"{name}.log")
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(started):
            proc.stop()
