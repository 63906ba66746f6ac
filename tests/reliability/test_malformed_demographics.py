"""Malformed demographics never fail a job, and no error text carries demographics (issue 13, 5).

A non-DICOM date (``1961-07-04`` as Patient's Birth Date), a bad Study Date / Time or a
Patient's Sex ``male`` made highdicom raise after inference; the job failed three times and
the birth date ended up in the log, the database and ``ctmtl-node status``. Now such values
are dropped (results carry them empty) and every error text the worker stores or logs goes
through ``dicom_node.scrub.scrub``.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from node.conftest import derive_series, store_files
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.config import NodeConfig, load_config
from dicom_node.db import Job, JobState, Series, SeriesState
from dicom_node.pipeline import run_process_command
from dicom_node.results import AlgorithmInfo, ResultOptions
from dicom_node.scrub import REDACTED, identifying_values, scrub
from dicom_node.seg import build_seg
from dicom_node.service import NodeService
from dicom_node.volume import load_series
from dicom_node.worker import Worker
from helpers import NODE_CLI, REPO, dcmtk_tool, wait_for
from mtl_model import Predictor

ALGORITHM = AlgorithmInfo(
    name="ctmtl test network", model_version="1.2.3", device_uid="2.25.4245", software_version="0"
)
BIRTH_DATE = "1961-07-04"
#: demographics of the failing job's series: none of these may show in its error texts
PATIENT = {
    "PatientName": "Yamada^Tarou",
    "PatientID": "MRN-4711-0815",
    "PatientBirthDate": BIRTH_DATE,
    "AccessionNumber": "ACC-99123",
}
FORBIDDEN = ("Yamada", "Tarou", "MRN-4711-0815", "ACC-99123", BIRTH_DATE, "19610704")


def _dcmodify(files: list[Path], assignments: dict[str, str]) -> None:
    """DCMTK's dcmodify writes the values as they are (no backup files)."""
    args = [arg for kw, value in assignments.items() for arg in ("-m", f"{kw}={value}")]
    proc = subprocess.run(
        [dcmtk_tool("dcmodify"), "-nb", *args, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


MALFORMED = {
    "birth-date": {"PatientBirthDate": BIRTH_DATE},
    "dates-time-sex": {
        "PatientBirthDate": BIRTH_DATE,
        "StudyDate": "2007-04-25",
        "StudyTime": "17:33:33",
        "PatientSex": "male",
    },
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_demographics_are_dropped_not_parsed(
    case: str,
    noncovid_files: list[Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
    dciodvfy_errors: Callable[[Path], list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    malformed = MALFORMED[case]
    files = derive_series(noncovid_files, tmp_path / "series")
    _dcmodify(files, malformed)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert source.get_item("PatientBirthDate").value.rstrip() == BIRTH_DATE.encode()

    caplog.set_level(logging.DEBUG)
    out = run_process_command(
        tmp_path / "series", tmp_path / "out", checkpoint=tiny_checkpoint, device="cpu"
    )

    for key in ("seg_path", "sr_path"):
        path = Path(out[key])
        assert dciodvfy_errors(path) == [], path.name
        result = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in malformed:
            assert keyword in result and result[keyword].is_empty, f"{path.name}: {keyword}"
        assert result.PatientName == source.PatientName  # the rest is copied as it is
        assert result.PatientID == source.PatientID
    log = caplog.text
    assert "results carry them empty" in log and "PatientBirthDate" in log
    for value in malformed.values():  # "male" also as a word of its own or quoted
        assert f"'{value}'" not in log and f" {value} " not in log, f"{value!r} in the log"
        assert len(value) < 8 or value not in log, f"{value!r} in the log"


def test_the_original_failure_text_is_scrubbed(noncovid_files: list[Path], tmp_path: Path) -> None:
    """highdicom's own error on the unrepaired headers quotes the birth date; the scrub
    function removes it (and the other demographics) from message and traceback."""
    files = derive_series(noncovid_files[:3], tmp_path / "series", _demographics)
    volume = load_series(files)
    empty = np.zeros(volume.shape, dtype=bool)
    with pytest.raises(ValueError) as info:
        build_seg(volume, empty, None, ResultOptions(), ALGORITHM, "2.25.1", "2.25.2")
    message = f"{info.type.__name__}: {info.value}"
    trace = "".join(traceback.format_exception(info.value))
    assert BIRTH_DATE in message  # the real text quotes it

    values = identifying_values(files)
    for text in (message, trace):
        cleaned = scrub(text, values)
        assert REDACTED in cleaned
        for value in FORBIDDEN:
            assert value not in cleaned
    assert scrub("job 7 failed (attempt 1/3)", values) == "job 7 failed (attempt 1/3)"


def _demographics(ds: Dataset, _index: int) -> None:
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)


@pytest.fixture
def node_config(tmp_path: Path) -> Callable[..., NodeConfig]:
    def make(**sections: Any) -> NodeConfig:
        base: dict[str, Any] = {
            "node": {"port": 0, "ae_title": "CTMTL"},
            "spool": {"path": str(tmp_path / "spool"), "min_free_mb": 0},
            "completion": {"idle_seconds": 1.0, "poll_interval_s": 0.2},
            "worker": {"poll_interval_s": 0.2, "max_attempts": 1},
            "export": {"enabled": False},
        }
        merged = copy.deepcopy(base)
        for key, value in sections.items():
            merged.setdefault(key, {}).update(value)
        return load_config(None, environ={}, overrides=merged)

    return make


def test_failing_job_stores_and_logs_no_demographics(
    node_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    noncovid_files: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job fails with an error that quotes the patient's values (the checkpoint this
    worker was given is named after the patient); what is stored, logged and shown by
    ``ctmtl-node status`` holds none of them."""
    caplog.set_level(logging.DEBUG)
    cfg = node_config()
    node = start_node(cfg, worker=False, exporter=False)  # the real SCP queues the job
    files = derive_series(noncovid_files, tmp_path / "series", _demographics)
    assert set(store_files(node.port, files)) == {0}
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    def queued() -> bool:
        with node.db.session() as s:
            return (
                s.scalars(select(Job).join(Series).where(Series.series_instance_uid == uid)).first()
                is not None
            )

    wait_for(queued, 60, "job queued")
    named = tmp_path / f"{PATIENT['PatientID']} {PATIENT['PatientName']} {BIRTH_DATE}.safetensors"
    worker = Worker(
        cfg,
        node.db,
        node.spool,
        predictor_factory=lambda: Predictor(checkpoint=named, device="cpu"),
        owner="reliability-test",
    )
    caplog.clear()  # from here: the worker's log
    assert wait_for(worker.run_once, 30, "job claimed") is not None

    with node.db.session() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        job = s.scalars(select(Job).where(Job.series_id == series.id)).one()
        state, reason, job_state, error = series.state, series.reason, job.state, job.error
    assert state == SeriesState.FAILED and job_state == JobState.FAILED
    assert error is not None and "CheckpointError" in error and REDACTED in error
    assert reason is not None and reason.startswith("processing failed")
    log = caplog.text
    assert "failed for good" in log and "Traceback" in log
    config = tmp_path / "node.toml"
    config.write_text(f'[spool]\npath = "{node.spool.root}"\n')
    shown = [
        subprocess.run(
            [*NODE_CLI, "status", "--config", str(config), *extra],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        for extra in ((), ("--json",))
    ]
    assert all(p.returncode == 0 for p in shown), [p.stderr for p in shown]
    assert "processing failed" in shown[0].stdout
    for value in FORBIDDEN:
        for where, text in (
            ("job.error", error),
            ("series.reason", reason),
            ("log", log),
            ("status", shown[0].stdout),
            ("status --json", shown[1].stdout),
        ):
            assert value not in text, f"{value!r} in {where}"
