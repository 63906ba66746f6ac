"""Fixtures for the node tests: real series on disk, configs in temp folders, real peers."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.config import NodeConfig, load_config
from dicom_node.service import NodeService

COVID_SERIES = "dicom/ricord-1a-covid-chest-ct"
NONCOVID_SERIES = "dicom/lung-pet-ct-dx-a0002"


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_tool(name: str) -> str:
    """A DCMTK binary (not the pynetdicom app of the same name in the venv)."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    pytest.skip(f"DCMTK {name} not installed (apt install dcmtk)")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    """Poll until `predicate()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


@pytest.fixture(scope="session")
def covid_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / COVID_SERIES).glob("*.dcm"))
    assert len(files) == 255, f"expected 255 files in {COVID_SERIES}, found {len(files)}"
    return files


@pytest.fixture(scope="session")
def noncovid_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / NONCOVID_SERIES).glob("*.dcm"))
    assert len(files) == 30
    return files


def derive_series(
    sources: list[Path],
    out_dir: Path,
    edit: Callable[[Dataset, int], None] | None = None,
    keep_pixels: bool = True,
) -> list[Path]:
    """Copy real instances into a new series (new study/series/SOP UIDs), optionally edited.

    `edit(ds, index)` may change any attribute (modality, image type, thickness...).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i, src in enumerate(sources):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        if edit is not None:
            edit(ds, i)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        path = out_dir / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., NodeConfig]:
    """A NodeConfig with a temp spool/SQLite, port 0 and short timings; sections override."""

    def make(**sections: Any) -> NodeConfig:
        base: dict[str, Any] = {
            "node": {"port": 0, "ae_title": "CTMTL"},
            "spool": {"path": str(tmp_path / "spool"), "min_free_mb": 0},
            "completion": {"idle_seconds": 1.0, "poll_interval_s": 0.2},
            "worker": {"poll_interval_s": 0.2},
            "export": {"poll_interval_s": 0.2, "initial_backoff_s": 0.2, "max_backoff_s": 1.0},
        }
        merged = copy.deepcopy(base)
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
        return load_config(None, environ={}, overrides=merged)

    return make


@pytest.fixture
def start_node() -> Iterator[Callable[..., NodeService]]:
    """Start in-process nodes; every one is stopped at teardown."""
    started: list[NodeService] = []

    def start(config: NodeConfig, **kwargs: Any) -> NodeService:
        service = NodeService(config, **kwargs)
        service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        service.stop(timeout=60)


class StoreSCP:
    """DCMTK storescp in a temp folder: the receiving PACS/workstation of export tests.

    DCMTK 3.6.7 has no option to bind to one address; it listens on a random free port
    for the test only, and the node connects to it on 127.0.0.1.
    """

    def __init__(self, folder: Path, ae_title: str = "STORESCP") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = (folder.parent / f"{folder.name}.log").open("w")
        self.proc = subprocess.Popen(
            [
                dcmtk_tool("storescp"),
                "--aetitle",
                ae_title,
                "--output-directory",
                str(folder),
                "--accept-all",
                str(self.port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._listening, 20, f"storescp on port {self.port}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"storescp exited with {self.proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    servers: list[StoreSCP] = []

    def start(name: str = "received", ae_title: str = "STORESCP") -> StoreSCP:
        server = StoreSCP(tmp_path / name, ae_title)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def copy_files(files: list[Path], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = dest / f.name
        shutil.copyfile(f, target)
        out.append(target)
    return out


def store_files(
    port: int, files: list[Path], calling_ae: str = "TESTSCU", called_ae: str = "CTMTL"
) -> list[int]:
    """C-STORE files over one pynetdicom association; return the statuses."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f, stop_before_pixels=False) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    seen: set[tuple[str, str]] = set()
    for ds in datasets:
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key not in seen:
            seen.add(key)
            ae.add_requested_context(*key)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association with the node failed"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-4 network with random weights (fast on CPU), saved as a real checkpoint."""
    import torch

    from mtl_model import CheckpointMetadata, build_model, save_checkpoint
    from mtl_model.checkpoint import ArchitectureSpec

    torch.manual_seed(0)
    tasks = ["segmentation", "classification"]
    model = build_model("mtl", base_width=4, input_size=256, tasks=tasks)
    meta = CheckpointMetadata(
        architecture=ArchitectureSpec(name="mtl", base_width=4, input_size=256, tasks=tasks),
        model_version="test-tiny-w4",
        notes="random weights, tests only",
    )
    return save_checkpoint(model, meta, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def pipeline_result(
    noncovid_files: list[Path], tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """SEG + SR of the real 30-slice series, made once by the processing pipeline."""
    from dicom_node.pipeline import process_series
    from mtl_model import Predictor

    predictor = Predictor(checkpoint=tiny_checkpoint, device="cpu", precision="fp32")
    return process_series(noncovid_files, tmp_path_factory.mktemp("result"), predictor)
