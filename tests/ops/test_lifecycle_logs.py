"""Observability: one log line per series lifecycle event, keyed by the Study and Series
Instance UIDs, and no patient names or IDs in the logs at the default level."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.cli import _setup_logging
from dicom_node.db import Delivery, DeliveryState, Series, SeriesState
from dicom_node.service import NodeService
from dicom_node.worker import build_predictor
from helpers import free_port, wait_for
from ops.conftest import send_files
from ops.synth import write_series

POISONED_SLICES = 9  # the series with this many slices fails in the network


class _FailingPredictor:
    """The real predictor, except that it raises on the poisoned series (a job that fails)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def predict_hu(self, hu: Any, **kwargs: Any) -> Any:
        if hu.shape[0] == POISONED_SLICES:
            raise RuntimeError("injected inference failure")
        return self.real.predict_hu(hu, **kwargs)


def _study_uid(files: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _series_state(node: NodeService, uid: str) -> str | None:
    with node.db.session() as s:
        row = s.scalars(select(Series).where(Series.series_instance_uid == uid)).first()
        return None if row is None else row.state


def _deliveries(node: NodeService) -> dict[str, str]:
    with node.db.session() as s:
        return {d.destination: d.state for d in s.scalars(select(Delivery))}


@pytest.mark.slow
def test_each_series_event_logs_one_line_with_both_uids(
    make_config: Callable[..., Any],
    start_node: Callable[..., NodeService],
    storescp: Callable[..., Any],
    tiny_checkpoint: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    pacs = storescp("pacs", "PACS")
    cfg = make_config(
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu", "precision": "fp32"},
        worker={"max_attempts": 1},
        export={"max_attempts": 1},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()},
        ],
        routing={"default": ["pacs", "down"]},
    )
    node = start_node(cfg, predictor_factory=lambda: _FailingPredictor(build_predictor(cfg)))

    patient_ids = {"ok": "PID-OK-4711", "short": "PID-SHORT-4712", "bad": "PID-BAD-4713"}
    ok_uid, ok_files = write_series(tmp_path / "ok", 8, 64, seed=1, patient_id=patient_ids["ok"])
    short_uid, short_files = write_series(
        tmp_path / "short", 4, 64, seed=2, patient_id=patient_ids["short"]
    )
    bad_uid, bad_files = write_series(
        tmp_path / "bad", POISONED_SLICES, 64, seed=3, patient_id=patient_ids["bad"]
    )
    for files in (ok_files, short_files, bad_files):
        assert send_files(node.port, files) == [0] * len(files)

    wait_for(
        lambda: (
            _deliveries(node) == {"pacs": DeliveryState.DONE, "down": DeliveryState.FAILED}
            and _series_state(node, short_uid) == SeriesState.REJECTED
            and _series_state(node, bad_uid) == SeriesState.FAILED
        ),
        120,
        "the three series to reach their final states",
        step=0.3,
    )
    assert len(pacs.files()) == 2

    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("dicom_node") and r.levelno >= logging.INFO
    ]

    def events(files: list[Path], uid: str) -> list[str]:
        mine = [line for line in lines if uid in line]
        study = _study_uid(files)
        for line in mine:  # every line names the series by both UIDs
            assert f"series {uid} study {study}" in line, line
        return mine

    expected = {
        ok_uid: (
            ok_files,
            [
                r"first instance received from PACS",
                r"complete: 8 instances, job \d+ queued",
                r"job \d+ started \(attempt 1\)",
                r"job \d+ done: .* covid_probability=[\d.]+ lesion_volume_ml=[\d.]+ "
                r".*lung_involvement_percent=[\d.]+ .*timings=\{.*'inference'",
                r"result \d+ delivered to pacs",
                r"delivery of result \d+ to down failed for good",
            ],
        ),
        short_uid: (
            short_files,
            [r"first instance received from PACS", r"rejected: .*slices"],
        ),
        bad_uid: (
            bad_files,
            [
                r"first instance received from PACS",
                r"complete: 9 instances",
                r"job \d+ started \(attempt 1\)",
                r"job \d+ failed for good: .*injected inference failure",
            ],
        ),
    }
    for uid, (files, patterns) in expected.items():
        mine = events(files, uid)
        assert len(mine) == len(patterns), "\n".join(mine)  # one line per event, no more
        for pattern in patterns:
            assert sum(bool(re.search(pattern, line)) for line in mine) == 1, (pattern, mine)

    # nothing about the patient at the default level, from any logger
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "Synthetic" not in text  # Patient Name "Synthetic^Ops"
    for pid in patient_ids.values():
        assert pid not in text


def test_cli_logging_keeps_library_chatter_out() -> None:
    names = ("highdicom", "pynetdicom", "alembic")
    before = {n: logging.getLogger(n).level for n in names}
    try:
        _setup_logging("INFO")
        for name in names:
            assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
