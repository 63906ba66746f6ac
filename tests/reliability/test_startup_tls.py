"""Issues 16.4 and 16.5: TLS files are checked before the node starts anything.

- A private key that every user may read (mode 0644), in `[node.tls]` or a destination's
  `tls`, is refused by `config check` and `serve` (exit 2, one line naming the file, its
  mode and the way out); `allow_readable_key = true` accepts it with a loud warning; a
  group-readable key (0640, the install guide's `root:ctmtl`) is fine.
- A missing TLS key file stops `serve` with one line and exit 2 before any thread or
  listener starts (it used to half-start and die with exit 1).

Real parts: keys and certificates made by the openssl CLI (tests/ops/certs.py), the
`ctmtl-node` process.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ops import conftest as ops_fixtures
from ops.certs import CertPair, make_ca
from ops.conftest import NodeProcess, base_sections, write_toml

from helpers import free_port, port_open, wait_for
from reliability.nodes import run_node

node_process = ops_fixtures.node_process  # the fixture, from its module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CertPair]:
    """A CA and the node's certificate with its key (mode 0600 as openssl writes it)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    pki = make_ca(tmp_path_factory.mktemp("pki"), cn="ctmtl key-mode test CA")
    return pki.ca_cert, pki.issue("node", "ctmtl-node", server=True)


def key_copy(site: tuple[Path, CertPair], folder: Path, mode: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / "node.key"
    shutil.copyfile(site[1].key, key)
    key.chmod(mode)
    return key


def inbound(site: tuple[Path, CertPair], key: Path, **extra: Any) -> dict[str, Any]:
    ca, pair = site
    return {
        "enabled": True,
        "port": free_port(),
        "cert_file": str(pair.cert),
        "key_file": str(key),
        "ca_file": str(ca),
        **extra,
    }


def serve_config(tmp_path: Path, **sections: Any) -> tuple[Path, int]:
    port = free_port()
    ours: dict[str, Any] = {
        "node": {"port": port},
        "worker": {"enabled": False},
        "metrics": {"enabled": False},
    }
    for key, value in sections.items():
        ours[key] = {**ours[key], **value} if isinstance(value, dict) and key in ours else value
    return write_toml(tmp_path / "node.toml", base_sections(tmp_path, **ours)), port


def refused(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "listening" not in out
    return errors[0]


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o606])
def test_world_readable_node_key_is_refused(
    tmp_path: Path, site: tuple[Path, CertPair], mode: int
) -> None:
    key = key_copy(site, tmp_path / "tls", mode)
    cfg, port = serve_config(tmp_path, node={"tls": inbound(site, key)})
    check = run_node("config", "check", str(cfg))
    assert check.returncode == 2, check.stdout + check.stderr
    message = f"node.tls: TLS private key {key} is readable by every user (mode {mode:04o})"
    assert message in check.stderr, check.stderr
    assert "allow_readable_key = true" in check.stderr
    line = refused(run_node("serve", "--config", str(cfg)))
    assert line.startswith(f"error: {message}"), line
    assert not port_open(port)


def test_world_readable_destination_key_is_refused(
    tmp_path: Path, site: tuple[Path, CertPair]
) -> None:
    ca, pair = site
    key = key_copy(site, tmp_path / "tls", 0o644)
    dest = {
        "name": "pacs",
        "ae_title": "PACS",
        "host": "127.0.0.1",
        "port": free_port(),
        "tls": {
            "enabled": True,
            "ca_file": str(ca),
            "cert_file": str(pair.cert),
            "key_file": str(key),
        },
    }
    cfg, port = serve_config(tmp_path, destinations=[dest], routing={"default": ["pacs"]})
    check = run_node("config", "check", str(cfg))
    assert check.returncode == 2, check.stdout + check.stderr
    assert f"destinations.0.tls: pacs: TLS private key {key} is readable by every user" in (
        check.stderr
    )
    line = refused(run_node("serve", "--config", str(cfg)))
    assert line.startswith("error: destinations.0.tls: pacs: TLS private key"), line
    assert not port_open(port)


def test_allow_readable_key_turns_the_refusal_into_a_warning(
    tmp_path: Path, site: tuple[Path, CertPair], node_process: Callable[..., NodeProcess]
) -> None:
    key = key_copy(site, tmp_path / "tls", 0o644)
    tls = inbound(site, key, allow_readable_key=True)
    cfg, port = serve_config(tmp_path, node={"tls": tls})
    check = run_node("config", "check", "-q", str(cfg))
    assert check.returncode == 0, check.stderr
    warning = f"TLS private key {key} is readable by every user (mode 0644)"
    assert "WARNING" in check.stderr and warning in check.stderr, check.stderr
    assert "accepted because allow_readable_key = true" in check.stderr
    node = node_process("serve", "--config", str(cfg))
    wait_for(lambda: port_open(tls["port"]) or not node.alive(), 60, "the TLS listener")
    assert node.alive(), node.log()
    assert port_open(port)
    assert warning in node.log() and "WARNING" in node.log()
    assert node.stop(30) == 0


def test_group_readable_key_is_accepted_quietly(
    tmp_path: Path, site: tuple[Path, CertPair]
) -> None:
    key = key_copy(site, tmp_path / "tls", 0o640)
    cfg, _ = serve_config(tmp_path, node={"tls": inbound(site, key)})
    check = run_node("config", "check", "-q", str(cfg))
    assert check.returncode == 0, check.stderr
    assert "TLS private key" not in check.stderr


def test_missing_key_file_stops_serve_before_anything_starts(
    tmp_path: Path, site: tuple[Path, CertPair]
) -> None:
    missing = tmp_path / "tls" / "gone.key"
    tls = inbound(site, missing)
    cfg, port = serve_config(tmp_path, node={"tls": tls}, metrics={"enabled": True, "port": 0})
    proc = run_node("serve", "--config", str(cfg))
    line = refused(proc)
    assert line == f"error: node.tls: TLS file {missing} does not exist", line
    out = proc.stdout + proc.stderr
    for started in ("metrics and health endpoints", "worker", "exporter", "completion"):
        assert started not in out, out
    assert not port_open(port) and not port_open(tls["port"])
