"""Fixtures of the viewer tests: the real RICORD series processed once by the shipped model
(SEG, SR and the optional Secondary Capture), Orthanc with only its DICOMweb plugin holding
CT + results, OHIF on one loopback origin (scripts/ohif_viewer.py, shared with
scripts/viewer.sh) and headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from helpers import REPO, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser

    from dicom_node.pipeline import SeriesResult

logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"


def _load_ohif_viewer() -> ModuleType:
    """scripts/ohif_viewer.py is a script (stdlib only, no package): load it by path."""
    spec = importlib.util.spec_from_file_location("ohif_viewer", REPO / "scripts/ohif_viewer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ohif_viewer = _load_ohif_viewer()


@pytest.fixture(scope="session")
def artefacts() -> Path:
    """Screenshots kept after the run: env CTMTL_ARTIFACTS, else .out/artifacts (ignored)."""
    root = Path(os.environ.get("CTMTL_ARTIFACTS") or REPO / ".out" / "artifacts")
    folder = root / "viewer"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    """The pinned OHIF build, fetched once per version into the user's cache."""
    if shutil.which("npm") is None:
        pytest.skip("npm not installed (apt install npm)")
    return Path(ohif_viewer.ensure_ohif())


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless (never a browser that `playwright install` fetched)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (apt install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            # as root (CI containers) Chromium's own sandbox cannot start
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def ricord_results(
    covid_files: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> SeriesResult:
    """The COVID-positive RICORD series through the node's pipeline with the shipped model
    (real lesions to look at), SEG + SR + the Secondary Capture (about 1.5 min on 2 cores)."""
    from dicom_node.pipeline import process_series
    from dicom_node.results import ResultOptions
    from mtl_model import Predictor

    options = ResultOptions(secondary_capture=True)
    out = tmp_path_factory.mktemp("ricord_results")
    result = process_series(covid_files, out, Predictor(), options)
    logger.info("RICORD processed: %s", result.timings)
    return result


@pytest.fixture(scope="module")
def viewer(
    ricord_results: SeriesResult,
    covid_files: list[Path],
    ohif_dist: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    """Orthanc (DICOMweb only) holding CT + SEG + SR + SC, and OHIF in front of it."""
    try:
        orthanc = ohif_viewer.OrthancDicomWeb(tmp_path_factory.mktemp("orthanc"), free_port())
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        results = [ricord_results.seg_path, ricord_results.sr_path, *ricord_results.extra_paths]
        orthanc.upload([*covid_files, *results])
        server = ohif_viewer.ViewerServer(ohif_dist, orthanc.http_port)
        try:
            yield server
        finally:
            server.stop()
    finally:
        orthanc.stop()
