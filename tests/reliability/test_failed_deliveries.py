"""Issue 13.9: deliveries that failed for good are easy to miss.

A node (exporter, metrics, SQLite) sends a result to a destination where nothing listens:
the delivery fails for good with "connection refused", `status` shows it (marker, `--state
failed`, `--state delivery-failed`, JSON), `ctmtl_deliveries_failed` counts it. When a
DCMTK storescp comes up at that address, the exporter's periodic C-ECHO finds it, queues
the delivery again (logged) and the objects arrive. The shipped retry budget is hours."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ops.synth import write_series
from sqlalchemy import select, update

from dicom_node.cli import main
from dicom_node.config import ExportSection, load_config
from dicom_node.db import Delivery, DeliveryState, Series, SeriesState
from dicom_node.export import backoff_seconds, retry_when_answering
from dicom_node.service import NodeService
from helpers import REPO, add_done_result, free_port, wait_for
from reliability.nodes import StoreSCPOn, metric, node_config

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.91", "1.2.826.0.1.3680043.8.498.91.2"


def _delivery(node: NodeService) -> Delivery:
    with node.db.session() as s:
        return s.scalars(select(Delivery)).one()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_failed_delivery_is_shown_counted_and_sent_when_the_destination_answers(
    start_node: Callable[..., NodeService],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    dest_port = free_port()  # nothing listens here yet
    cfg, _, url = node_config(
        tmp_path,
        None,
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": dest_port,
             "timeout_s": 5}
        ],
        routing={"default": ["pacs"]},
        export={"max_attempts": 2, "initial_backoff_s": 0.1, "max_backoff_s": 0.2,
                "recheck_failed_s": 0.5},
    )  # fmt: skip
    node = start_node(load_config(cfg, environ={}), scp=False, worker=False, config_path=cfg)
    _, files = write_series(tmp_path / "result", n_slices=2, size=32)
    add_done_result(
        node.db, node.config.destinations, files[0], files[1], study_uid=STUDY,
        series_uid=SERIES, instance_file=str(files[0]), calling_ae="MODALITY",
    )  # fmt: skip
    with node.db.session() as s:  # as the worker leaves it: processed
        s.execute(update(Series).values(state=SeriesState.DONE))

    wait_for(lambda: _delivery(node).state == DeliveryState.FAILED, 30, "the delivery to fail")
    d = _delivery(node)
    assert d.attempts == 2
    assert f"connection refused (127.0.0.1:{dest_port})" in (d.last_error or "")
    assert "aborted or no answer" not in (d.last_error or "")

    conf = ["--config", str(cfg)]
    (row,) = json.loads(_cli(capsys, "status", "--json", "--state", "failed", *conf))
    assert row["series_instance_uid"] == SERIES
    assert row["state"] == "done" and row["delivery_failed"] == ["pacs"]
    assert len(json.loads(_cli(capsys, "status", "--json", "--state", "delivery-failed", *conf)))
    assert f"series {SERIES}  [delivery failed: pacs]" in _cli(capsys, "status", *conf)
    assert metric(url, "ctmtl_deliveries_failed", destination="pacs") == 1

    time.sleep(1.5)  # rechecks while the destination is still down change nothing
    d = _delivery(node)
    assert d.state == DeliveryState.FAILED and d.attempts == 2
    assert not [r for r in caplog.records if "answers C-ECHO again" in r.getMessage()]

    pacs = StoreSCPOn(tmp_path / "pacs", dest_port)  # the PACS is back
    try:
        wait_for(lambda: len(pacs.files()) == 2, 30, "SEG and SR at the PACS")
        wait_for(lambda: _delivery(node).state == DeliveryState.DONE, 30, "delivery recorded")
    finally:
        pacs.stop()
    assert _delivery(node).last_error is None
    again = [r.getMessage() for r in caplog.records if "answers C-ECHO again" in r.getMessage()]
    assert len(again) == 1 and "1 failed deliveries queued again" in again[0]
    assert [
        r.getMessage()
        for r in caplog.records
        if f"series {SERIES} study {STUDY}: delivery of result" in r.getMessage()
        and "queued again" in r.getMessage()
    ]
    assert json.loads(_cli(capsys, "status", "--json", "--state", "failed", *conf)) == []
    (row,) = json.loads(_cli(capsys, "status", "--json", *conf))
    assert row["delivery_failed"] == []
    assert "[delivery failed" not in _cli(capsys, "status", *conf)
    assert metric(url, "ctmtl_deliveries_failed", destination="pacs") == 0


def test_objects_refused_by_status_are_left_to_resend() -> None:
    refused = "PACS@127.0.0.1:104: C-STORE of SEG_1.dcm failed, status 0xA900 "
    busy = "PACS@127.0.0.1:104: C-STORE of SEG_1.dcm failed, status 0xA700 out of resources"
    assert not retry_when_answering(refused)
    assert retry_when_answering(busy)
    assert retry_when_answering("cannot connect to PACS@h:104: connection refused (h:104)")
    assert retry_when_answering(None)


def test_default_retry_budget_outlasts_a_maintenance_window() -> None:
    def budget(e: Any) -> float:
        return sum(
            backoff_seconds(a, e.initial_backoff_s, e.max_backoff_s)
            for a in range(1, e.max_attempts)
        )

    defaults = ExportSection()
    assert defaults.max_backoff_s == 600  # the cap stays
    assert budget(defaults) >= 12 * 3600
    shipped = load_config(REPO / "config" / "node.toml", environ={}).export
    assert shipped.max_backoff_s == 600 and budget(shipped) >= 12 * 3600
