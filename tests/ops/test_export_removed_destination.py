"""A queued delivery whose destination left the config is failed, never sent in cleartext;
`resend` sends it once the destination is configured again."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.admin import resend_series
from dicom_node.db import (
    Database,
    Delivery,
    DeliveryState,
    InstanceRecord,
    Job,
    JobState,
    Result,
    Series,
    record_instance,
)
from dicom_node.export import Exporter, queue_deliveries
from ops.synth import write_series

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.2"


def _result_with_deliveries(db: Database, cfg: Any, files: list[Path]) -> int:
    """Rows as the worker leaves them: a done job, its result, one delivery per route."""
    db.upgrade()
    record_instance(
        db,
        InstanceRecord(
            STUDY, SERIES, f"{SERIES}.1", "1.2.840.10008.5.1.4.1.1.2", None, str(files[0]), 1,
            "0" * 64, calling_ae="MODALITY",
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
            lesion_volume_ml=1.0,
            seg_path=str(files[0]),
            sr_path=str(files[1]),
        )
        s.add(row)
        s.flush()
        queue_deliveries(s, row, cfg.destinations)
        return row.id


def _delivery(db: Database) -> Delivery:
    with db.session() as s:
        return s.scalars(select(Delivery)).one()


def test_removed_destination_fails_instead_of_falling_back_to_plain_tcp(
    make_config: Callable[..., Any],
    storescp: Callable[..., Any],
    pki: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # whatever listens at the stored address would take a cleartext association
    listener = storescp("listener", "PACS")
    tls_dest = {
        "name": "pacs",
        "ae_title": "PACS",
        "host": "127.0.0.1",
        "port": listener.port,
        "timeout_s": 5,
        "tls": {"enabled": True, "ca_file": str(pki["ca"])},
    }
    queued_with = make_config(destinations=[tls_dest], routing={"default": ["pacs"]})
    _, files = write_series(tmp_path / "result", n_slices=2, size=32)
    db = Database(queued_with.database_url)
    _result_with_deliveries(db, queued_with, files)

    # the destination is removed from the config (reload) before the delivery goes out
    exporter = Exporter(make_config(), db)
    try:
        with caplog.at_level(logging.INFO, logger="dicom_node"):
            assert exporter.run_once() == 1
        d = _delivery(db)
        assert d.state == DeliveryState.FAILED and d.attempts == 1
        assert "no longer in the configuration" in (d.last_error or "")
        assert "resend" in (d.last_error or "")
        assert listener.files() == []  # nothing went out, in cleartext or otherwise
        assert exporter.run_once() == 0  # failed for good: not retried
        logged = [r for r in caplog.records if "no longer in the configuration" in r.message]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR
        assert f"series {SERIES} study {STUDY}" in logged[0].message

        # an administrator configures the peer again and resends
        fixed = make_config(
            destinations=[{k: v for k, v in tls_dest.items() if k != "tls"}],
            routing={"default": ["pacs"]},
        )
        exporter.config = fixed
        assert resend_series(db, fixed, SERIES) == [
            ("pacs", f"queued (PACS@127.0.0.1:{listener.port})")
        ]
        assert exporter.run_once() == 1
        d = _delivery(db)
        assert d.state == DeliveryState.DONE and d.last_error is None
        assert len(listener.files()) == 2
    finally:
        exporter.close()
        db.dispose()
