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
)
from dicom_node.export import Exporter
from helpers import add_done_result
from ops.synth import write_series

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.2"


def _result_with_deliveries(db: Database, cfg: Any, files: list[Path]) -> int:
    return add_done_result(
        db, cfg.destinations, files[0], files[1], study_uid=STUDY, series_uid=SERIES,
        instance_file=str(files[0]), calling_ae="MODALITY",
    )  # fmt: skip


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
