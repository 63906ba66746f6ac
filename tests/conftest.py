"""Shared fixtures: where the real data lives and whether its absence is fatal, the real
series, a tiny checkpoint, in-process nodes and DCMTK storescp peers (see helpers.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from helpers import (
    COVID_SERIES,
    NONCOVID_SERIES,
    StoreSCP,
    find_tool,
    save_tiny_checkpoint,
    tiny_model,
)

if TYPE_CHECKING:
    import pydicom

    from dicom_node.config import NodeConfig
    from dicom_node.service import NodeService


def data_root() -> Path:
    """The real data folder: env CTMTL_DATA, else ../shared/data beside the checkout."""
    from mtl_model.stacks import default_data_root

    return default_data_root()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data; skips when absent unless CTMTL_REQUIRE_DATA=1 (as in CI)."""
    root = data_root()
    if not root.is_dir():
        if os.environ.get("CTMTL_REQUIRE_DATA") == "1":
            pytest.fail(f"CTMTL_REQUIRE_DATA=1 but the data folder {root} is missing")
        pytest.skip(f"real data not found at {root} (set CTMTL_DATA)")
    return root


# --------------------------------------------------------------------------- real series


@pytest.fixture(scope="session")
def covid_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / COVID_SERIES).glob("*.dcm"))
    assert len(files) == 255, f"expected 255 files in {COVID_SERIES}, found {len(files)}"
    return files


@pytest.fixture(scope="session")
def noncovid_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / NONCOVID_SERIES).glob("*.dcm"))
    assert len(files) == 30, f"expected 30 files in {NONCOVID_SERIES}, found {len(files)}"
    return files


@pytest.fixture(scope="session")
def covid_headers(covid_files: list[Path]) -> list[pydicom.Dataset]:
    """Headers only (no pixels); shared, so copy before editing."""
    import pydicom

    return [pydicom.dcmread(f, stop_before_pixels=True) for f in covid_files]


@pytest.fixture(scope="session")
def noncovid_headers(noncovid_files: list[Path]) -> list[pydicom.Dataset]:
    """Headers only (no pixels); shared, so copy before editing."""
    import pydicom

    return [pydicom.dcmread(f, stop_before_pixels=True) for f in noncovid_files]


# --------------------------------------------------------------------------- model


@pytest.fixture(scope="session", autouse=True)
def _engine_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """OpenVINO engines that tests build (model.engine auto) go to a session temp folder,
    also for the node processes tests start, never to the user's ~/.cache."""
    # node processes run the torch reference unless a test asks for an engine
    os.environ.setdefault("CTMTL_MODEL__ENGINE", "torch")
    if os.environ.get("CTMTL_CACHE_DIR"):
        yield
        return
    os.environ["CTMTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("engine_cache"))
    yield
    os.environ.pop("CTMTL_CACHE_DIR", None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-4 random-weight checkpoint with the two inference heads (fast on CPU)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_tiny_checkpoint(tiny_model(0), path, model_version="0.0.0-test")


# --------------------------------------------------------------------------- tools, peers


@pytest.fixture(scope="session")
def dciodvfy_errors() -> Callable[[Path], list[str]]:
    """Run dicom3tools' dciodvfy on a file; return its "Error" lines (warnings are ok)."""
    exe = find_tool("dciodvfy")

    def run(path: Path) -> list[str]:
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=300)
        lines = (proc.stdout + proc.stderr).splitlines()
        return [line for line in lines if line.strip().startswith("Error")]

    return run


@pytest.fixture
def start_node() -> Iterator[Callable[..., NodeService]]:
    """Start in-process nodes; every one is stopped at teardown."""
    from dicom_node.service import NodeService

    started: list[NodeService] = []

    def start(config: NodeConfig, **kwargs: Any) -> NodeService:
        service = NodeService(config, **kwargs)
        service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        service.stop(timeout=60)


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung PACS or peer)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for c in conns:
        c.close()
    server.close()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Start DCMTK storescp peers in `tmp_path/<name>`; every one is stopped at teardown."""
    servers: list[StoreSCP] = []

    def start(name: str = "pacs", ae_title: str = "PACS", tls: Sequence[str] = ()) -> StoreSCP:
        server = StoreSCP(tmp_path / name, ae_title, tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
