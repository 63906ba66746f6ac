"""The systemd units pass `systemd-analyze verify` (in a temporary root that has the
binaries the units name), and they keep the promised settings."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import REPO

UNITS = REPO / "systemd"
NODE_UNIT = "ctmtl-node.service"
WORKER_UNIT = "ctmtl-worker@.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


@pytest.fixture(scope="module")
def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (apt install systemd); CI installs it")
    return exe


def make_root(root: Path) -> Path:
    """A minimal root for `--root`: the distribution's units, kill, our binary path."""
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    shutil.copy2(shutil.which("kill") or "/usr/bin/kill", root / "usr/bin/kill")
    exe = root / "opt/ctmtl/.venv/bin/ctmtl-node"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (NODE_UNIT, WORKER_UNIT):
        shutil.copy2(UNITS / unit, units / unit)
    return units


def verify(analyze: str, root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    return subprocess.run(
        [analyze, "verify", f"--root={root}", *units],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_units_verify_cleanly(analyze: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_root(root)
    res = verify(analyze, root, NODE_UNIT, "ctmtl-worker@0.service", "ctmtl-worker@1.service")
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr  # no unknown keys, no warnings


def test_verify_catches_mistakes(analyze: str, tmp_path: Path) -> None:
    """The check is real: a misspelt key warns and a missing binary fails."""
    root = tmp_path / "root"
    units = make_root(root)
    text = (units / NODE_UNIT).read_text()
    (units / "typo.service").write_text(text.replace("NoNewPrivileges=", "NoNewPrivilege="))
    res = verify(analyze, root, "typo.service")
    assert "Unknown key" in res.stderr
    (units / "nobin.service").write_text(text.replace("/opt/ctmtl/.venv/bin/", "/opt/none/"))
    assert verify(analyze, root, "nobin.service").returncode != 0


def _service_section(unit: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = None
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("unit", [NODE_UNIT, WORKER_UNIT])
def test_hardening_and_lifecycle(unit: str) -> None:
    s = _service_section(unit)
    assert s["User"] == ["ctmtl"] and s["Group"] == ["ctmtl"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["ReadWritePaths"] == ["/var/lib/ctmtl"]
    assert s["Restart"] == ["on-failure"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert int(s["TimeoutStopSec"][0]) >= 300  # time to finish the running job
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert any("config check /etc/ctmtl/node.toml" in v for v in s["ExecStartPre"])


def test_worker_unit_is_one_gpu_per_instance() -> None:
    s = _service_section(WORKER_UNIT)
    env = dict(v.split("=", 1) for v in s["Environment"])
    assert env["CUDA_VISIBLE_DEVICES"] == "%i"
    assert s["ExecStart"] == [
        "/opt/ctmtl/.venv/bin/ctmtl-node worker --config /etc/ctmtl/node.toml"
    ]
    node = _service_section(NODE_UNIT)
    assert node["ExecStart"] == [
        "/opt/ctmtl/.venv/bin/ctmtl-node serve --config /etc/ctmtl/node.toml"
    ]
