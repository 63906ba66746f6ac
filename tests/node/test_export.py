"""Export: SEG + SR to DCMTK storescp, retries with backoff, no destination blocks another."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.db import (
    Database,
    Delivery,
    DeliveryState,
)
from dicom_node.export import Exporter, Peer, backoff_seconds, echo
from helpers import StoreSCP, add_done_result, free_port, wait_for


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_seconds(a, 5, 60) for a in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def _db_with_result(cfg: NodeConfig, result: Any) -> tuple[Database, int]:
    db = Database(cfg.database_url)
    return db, add_done_result(db, cfg.destinations, result.seg_path, result.sr_path)


def _deliveries(db: Database) -> dict[str, Delivery]:
    with db.session() as s:
        return {d.destination: d for d in s.scalars(select(Delivery))}


@pytest.mark.slow
def test_delivery_retries_and_independence(
    make_config: Callable[..., NodeConfig],
    storescp: Callable[..., StoreSCP],
    silent_peer: int,
    pipeline_result: Any,
) -> None:
    pacs = storescp("pacs", "PACS")
    dead_port = free_port()  # nothing listens: connection refused
    cfg = make_config(
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            {
                "name": "hung",
                "ae_title": "HUNG",
                "host": "127.0.0.1",
                "port": silent_peer,
                "timeout_s": 2.5,
            },
            {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": dead_port},
        ],
        export={"max_attempts": 3, "initial_backoff_s": 0.3, "max_backoff_s": 0.6},
    )
    db, _ = _db_with_result(cfg, pipeline_result)
    exporter = Exporter(cfg, db)
    try:
        t0 = time.monotonic()
        assert exporter.dispatch() == 3  # all three start at once, one each
        # the good destination is served while the hung one still waits for its timeout
        wait_for(
            lambda: _deliveries(db)["pacs"].state == DeliveryState.DONE,
            2.0,
            "delivery to the live PACS",
        )
        assert time.monotonic() - t0 < 2.5
        assert _deliveries(db)["hung"].state == DeliveryState.SENDING
        received = {pydicom.dcmread(f).SOPInstanceUID for f in pacs.files()}
        assert received == {
            pipeline_result.seg_sop_instance_uid,
            pipeline_result.sr_sop_instance_uid,
        }
        exporter.wait(timeout=30)
        d = _deliveries(db)
        assert d["down"].state == DeliveryState.PENDING and d["down"].attempts == 1
        assert f"DOWN@127.0.0.1:{dead_port}" in (d["down"].last_error or "")
        assert d["hung"].state == DeliveryState.PENDING
        # keep dispatching: both failing destinations give up after max_attempts
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            exporter.dispatch()
            d = _deliveries(db)
            if all(x.state in (DeliveryState.DONE, DeliveryState.FAILED) for x in d.values()):
                break
            time.sleep(0.1)
        exporter.wait(timeout=30)
        d = _deliveries(db)
        assert {k: (v.state, v.attempts) for k, v in d.items()} == {
            "pacs": (DeliveryState.DONE, 1),
            "hung": (DeliveryState.FAILED, 3),
            "down": (DeliveryState.FAILED, 3),
        }
        assert len(pacs.files()) == 2  # delivered once, never re-sent
    finally:
        exporter.close()
        db.dispose()


def test_echo_against_storescp(storescp: Callable[..., StoreSCP]) -> None:
    pacs = storescp("echo", "PACS")
    ok, message = echo(Peer("PACS", "127.0.0.1", pacs.port, "CTMTL", 10))
    assert ok, message
    ok, message = echo(Peer("PACS", "127.0.0.1", free_port(), "CTMTL", 3))
    assert not ok
