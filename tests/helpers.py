"""Helpers shared by the test suites: ports, polling, external tools, DCMTK storescp, tiny
random-weight models and real-data helpers.

A plain module, imported as `helpers`: pytest puts `tests/` on `sys.path` for the
top-level `tests/conftest.py` (no `__init__.py` there), as it does for `ops` and `node`.
Fixtures built on these live in `tests/conftest.py`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import pydicom
    from torch import nn

REPO = Path(__file__).resolve().parent.parent
NODE_CLI = [sys.executable, "-m", "dicom_node"]

COVID_SERIES = "dicom/ricord-1a-covid-chest-ct"
NONCOVID_SERIES = "dicom/lung-pet-ct-dx-a0002"

# the keys `ctmtl-node process` prints and `run_process_command` returns, at the least
PROCESS_RESULT_KEYS = (
    "series_instance_uid",
    "covid_probability",
    "lesion_volume_ml",
    "lung_involvement_percent",
    "seg_path",
    "sr_path",
)

# ------------------------------------------------------------------------ network, polling


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on the loopback interface right now, for a server a test starts.

    Taken below the kernel's ephemeral range: a port from there (bind to port 0) can be
    taken by any outgoing connection before the server binds it, which once made the
    node's SCP find its port in use. Never the same port twice in one test session.
    """
    high = min(_ephemeral_low(), 65536) - 1
    low = max(1024, high - 12000)
    for _ in range(500):
        port = random.randint(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {low}..{high} on 127.0.0.1")


def port_open(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy and return it; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def orthanc_answers(proc: subprocess.Popen[Any], get: Callable[[str], Any]) -> bool:
    """Whether the Orthanc started as `proc` answers its REST API (`get("/system")`); fails
    the test at once if it exited instead (a bad config, a port taken)."""
    if proc.poll() is not None:
        pytest.fail(f"Orthanc exited with {proc.returncode}")
    try:
        return bool(get("/system"))
    except (urllib.error.URLError, ConnectionError):
        return False


# ------------------------------------------------------------------------ external tools


def dcmtk_tool(name: str) -> str:
    """A DCMTK binary (not the pynetdicom app of the same name that the venv may have)."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    pytest.skip(f"DCMTK {name} not installed (apt install dcmtk)")


def find_tool(name: str) -> str:
    """A tool from the venv (pip-installed, e.g. dcmqi) or else from PATH; skip if absent."""
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM a child process and wait for it; SIGKILL it after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class StoreSCP:
    """DCMTK storescp in a temp folder: the receiving PACS of the export tests.

    Accepts every transfer syntax it supports; unique file names, so that an object
    delivered twice shows as two files. `tls` are extra storescp options (`+tls ...`).
    DCMTK 3.6.7 has no option to bind to one address: it listens on a random free port
    for the test only, and the node connects to it on 127.0.0.1.
    """

    def __init__(self, folder: Path, ae_title: str = "PACS", tls: Sequence[str] = ()) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder.parent / f"{folder.name}.log"
        self._log = self.log_path.open("w")
        cmd = [dcmtk_tool("storescp"), "--aetitle", ae_title, "--output-directory", str(folder),
               "--accept-all", "--unique-filenames", *tls, str(self.port)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._listening, 20, f"storescp on port {self.port}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"storescp exited with {self.proc.returncode}: {self.log_path.read_text()}")
        return port_open(self.port)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self._log.close()


# ------------------------------------------------------------------------ tiny models

INFERENCE_TASKS = ["segmentation", "classification"]


def tiny_model(seed: int) -> nn.Module:
    """The width-4 network with the two inference heads and random weights (fast on CPU)."""
    import torch

    from mtl_model import build_model

    torch.manual_seed(seed)
    return build_model("mtl", base_width=4, input_size=256, tasks=INFERENCE_TASKS)


def save_tiny_checkpoint(model: nn.Module, path: Path, model_version: str) -> Path:
    """Save a `tiny_model` as a real checkpoint."""
    from mtl_model import CheckpointMetadata, save_checkpoint
    from mtl_model.checkpoint import ArchitectureSpec

    meta = CheckpointMetadata(
        architecture=ArchitectureSpec(
            name="mtl", base_width=4, input_size=256, tasks=INFERENCE_TASKS
        ),
        model_version=model_version,
        notes="random weights, tests only",
    )
    return save_checkpoint(model, meta, path)


# ------------------------------------------------------------------------ DICOM


def copy_files(files: Sequence[Path], dest: Path) -> list[Path]:
    """Copy files into `dest` (made if missing) under their own names."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = dest / f.name
        shutil.copyfile(f, target)
        out.append(target)
    return out


def legacy_multiframe(files: Sequence[Path], seed: int, series_number: int) -> pydicom.Dataset:
    """A series as one Legacy Converted Enhanced CT instance, frames shuffled by `seed`."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    datasets = [pydicom.dcmread(f) for f in files]
    random.Random(seed).shuffle(datasets)
    for ds in datasets:  # highdicom's converter copies these as-is; make them valid
        ds.PatientName = "Lung_Dx^A0002"
    return hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        include_dimension_index=False,  # keep the shuffled frame order
    )


def add_done_result(
    db: Any,
    destinations: Any,
    seg_path: Path,
    sr_path: Path,
    *,
    study_uid: str = "1.2.3",
    series_uid: str = "1.2.3.4",
    instance_file: str = "/x.dcm",
    calling_ae: str = "PACS",
) -> int:
    """Rows as the worker leaves them: one instance, a done job, its result and one queued
    delivery per destination; returns the result id (export tests start from here)."""
    from sqlalchemy import select

    from dicom_node.db import InstanceRecord, Job, JobState, Result, Series, record_instance
    from dicom_node.export import queue_deliveries

    db.upgrade()
    record_instance(
        db,
        InstanceRecord(
            study_uid, series_uid, f"{series_uid}.1", "1.2.840.10008.5.1.4.1.1.2", None,
            instance_file, 1, "0" * 64, calling_ae=calling_ae,
        ),
    )  # fmt: skip
    with db.session() as s:
        series = s.scalars(select(Series)).one()
        job = Job(series_id=series.id, state=JobState.DONE, n_instances=1, attempts=1)
        s.add(job)
        s.flush()
        row = Result(
            job_id=job.id,
            series_id=series.id,
            covid_probability=0.5,
            lesion_volume_ml=0.0,
            seg_path=str(seg_path),
            sr_path=str(sr_path),
        )
        s.add(row)
        s.flush()
        queue_deliveries(s, row, destinations)
        return int(row.id)
