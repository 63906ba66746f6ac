"""Multi-process training with torchrun: 2 CPU processes, gloo, tiny width, few steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_model import load_checkpoint
from training.config import dump_toml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_torchrun_two_cpu_processes(mini_data: Path, tmp_path: Path, tiny_config) -> None:
    cfg = tiny_config(train={"epochs": 2, "max_steps_per_epoch": 2, "batch_size": 2})
    conf = tmp_path / "tiny.toml"
    conf.write_text(dump_toml(cfg))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "training.cli",
        "fit",
        "--config",
        str(conf),
        "--out",
        str(out),
        "--data",
        str(mini_data),
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["epochs_run"] == 2 and summary["steps"] == 4
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch, written by rank 0 only
    _model, meta = load_checkpoint(out / "best.safetensors")
    assert meta.training["world_size"] == 2
    # the CLI printed one JSON line (rank 0 only)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["epochs_run"] == 2
