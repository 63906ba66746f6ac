"""The example config serves metrics on loopback; a port the node cannot have stops it with
one clear line naming the port and its config key."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.config import load_config
from helpers import NODE_CLI, REPO, free_port
from ops.conftest import base_sections, write_toml

EXAMPLE = REPO / "config" / "node.toml"


def test_example_config_serves_metrics_on_loopback_apart_from_dicom_ports() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.metrics.enabled
    assert cfg.metrics.bind == "127.0.0.1"
    dicom_ports = {cfg.node.port, 2762} | {d.port for d in cfg.destinations}  # 2762: TLS example
    assert cfg.metrics.port not in dicom_ports


def test_metrics_port_equal_to_a_dicom_port_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = base_sections(tmp_path, node={"port": 11112}, metrics={"enabled": True, "port": 11112})
    assert main(["config", "check", str(write_toml(tmp_path / "node.toml", data))]) == 2
    assert "metrics.port 11112 is also node.port" in capsys.readouterr().err


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _serve(tmp_path: Path, **sections: object) -> subprocess.CompletedProcess[str]:
    data = base_sections(tmp_path, worker={"enabled": False}, **sections)
    config = write_toml(tmp_path / "node.toml", data)
    return subprocess.run(
        [*NODE_CLI, "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


@pytest.mark.parametrize("key", ["metrics.port", "node.port"])
def test_port_in_use_stops_the_node_with_one_clear_line(
    tmp_path: Path, taken_port: int, key: str
) -> None:
    if key == "metrics.port":
        sections = {"node": {"port": free_port()}, "metrics": {"enabled": True, "port": taken_port}}
    else:
        sections = {"node": {"port": taken_port}}
    proc = _serve(tmp_path, **sections)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: {key}: cannot listen on 127.0.0.1:{taken_port}")
    assert f"set {key} to a free port" in errors[0]
    if key == "node.port":  # nothing started before the port was found taken
        assert "completion monitor started" not in proc.stderr
