"""`ctmtl-node` as a user runs it: help, config check, echo, process, status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import NodeConfig
from dicom_node.service import NodeService
from helpers import NODE_CLI, PROCESS_RESULT_KEYS, REPO, free_port, wait_for

from .conftest import derive_series, store_files


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NODE_CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def test_help_explains_every_command() -> None:
    out = cli("--help")
    assert out.returncode == 0
    for command in ("serve", "process", "echo", "status", "config"):
        assert command in out.stdout
    assert "not a medical device" in out.stdout
    for command in (["serve"], ["process"], ["echo"], ["status"], ["config", "check"]):
        sub = cli(*command, "--help")
        assert sub.returncode == 0 and "usage: ctmtl-node" in sub.stdout, command


HUGE_PAGES = """
import sys
if sys.argv[1] == "main":
    from dicom_node.cli import main
    try:
        main(["--help"])
    except SystemExit:
        pass
try:
    from numpy._core import multiarray
except ImportError:  # numpy 1
    from numpy.core import multiarray
print(multiarray._get_madvise_hugepage())
"""


def test_node_commands_keep_numpy_off_huge_pages_unless_the_site_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ctmtl-node sets numpy's NUMPY_MADVISE_HUGEPAGE to 0 before numpy is imported (the
    kernel's compaction for huge pages slowed every series); a value the site sets stays."""
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)

    def advice(how: str, **env: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", HUGE_PAGES, how],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
            env={**os.environ, **env},
        )
        return run.stdout.split()[-1]

    assert advice("plain") == "True"  # numpy's own default on this kernel
    assert advice("main") == "False"
    assert advice("main", NUMPY_MADVISE_HUGEPAGE="1") == "True"


def test_config_check(tmp_path: Path) -> None:
    ok = cli("config", "check", str(REPO / "config" / "node.toml"))
    assert ok.returncode == 0, ok.stderr
    assert "[node]" in ok.stdout and 'ae_title = "CTMTL"' in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_title = "A\\\\B"\nport = 0.5\n[spool]\nretention = 3\n')
    out = cli("config", "check", str(bad))
    assert out.returncode != 0
    for key in ("node.ae_title", "node.port", "spool.retention"):
        assert key in out.stderr, out.stderr


@pytest.mark.slow
def test_echo_by_address_and_by_destination_name(
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    tmp_path: Path,
) -> None:
    node = start_node(
        make_config(allowed_callers=[{"ae_title": "ADMIN"}]), worker=False, exporter=False
    )
    ok = cli("echo", f"CTMTL@127.0.0.1:{node.port}", "--calling-ae", "ADMIN")
    assert ok.returncode == 0 and "success" in ok.stdout, ok.stdout + ok.stderr
    refused = cli("echo", f"CTMTL@127.0.0.1:{node.port}", "--calling-ae", "NOBODY")
    assert refused.returncode == 1 and "rejected" in refused.stdout
    config = tmp_path / "admin.toml"
    config.write_text(
        f'[node]\nae_title = "ADMIN"\n[[destinations]]\nname = "ai"\nae_title = "CTMTL"\n'
        f'host = "127.0.0.1"\nport = {node.port}\n'
    )
    by_name = cli("echo", "ai", "--config", str(config))
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    nowhere = cli("echo", f"CTMTL@127.0.0.1:{free_port()}", "--timeout", "3")
    assert nowhere.returncode == 1
    bad = cli("echo", "not-a-peer")
    assert bad.returncode == 2 and "AE@host:port" in bad.stderr


@pytest.mark.slow
def test_process_prints_one_json_line(
    tiny_checkpoint: Path, noncovid_files: list[Path], tmp_path: Path
) -> None:
    out = cli(
        "--log-level",
        "WARNING",
        "process",
        str(noncovid_files[0].parent),
        "--out",
        str(tmp_path / "out"),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in PROCESS_RESULT_KEYS:
        assert key in result
    assert Path(result["seg_path"]).is_file() and Path(result["sr_path"]).is_file()
    assert pydicom.dcmread(result["seg_path"]).Modality == "SEG"
    empty = tmp_path / "empty"
    empty.mkdir()
    rejected = cli(
        "process", str(empty), "--out", str(tmp_path / "o2"), "--checkpoint", str(tiny_checkpoint)
    )
    assert rejected.returncode == 3 and "no DICOM files" in rejected.stderr


def test_status_shows_states_and_reasons(
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    noncovid_files: list[Path],
    tmp_path: Path,
) -> None:
    node = start_node(make_config(), worker=False, exporter=False)
    few = derive_series(noncovid_files[:5], tmp_path / "few")
    store_files(node.port, few)
    uid = str(pydicom.dcmread(few[0], stop_before_pixels=True).SeriesInstanceUID)
    config = tmp_path / "node.toml"
    config.write_text(f'[spool]\npath = "{node.spool.root}"\n')

    def shown() -> dict[str, object] | None:
        out = cli("status", "--config", str(config), "--json")
        assert out.returncode == 0, out.stderr
        rows = {r["series_instance_uid"]: r for r in json.loads(out.stdout)}
        row = rows.get(uid)
        return row if row and row["state"] == "rejected" else None

    row = wait_for(shown, 30, "rejected series in status")
    assert "5 slices, fewer than the minimum 20" in str(row["reason"])
    text = cli("status", "--config", str(config))
    assert uid in text.stdout and "reason: 5 slices" in text.stdout
