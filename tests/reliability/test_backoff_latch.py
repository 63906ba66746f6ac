"""The shared helper of the loops (dicom_node.backoff): bounded jittered backoff, latches
that log once per state change, and the classification of real errors (a refused
PostgreSQL connection, a full SQLite disk, ENOSPC)."""

from __future__ import annotations

import errno
import logging
import random
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from dicom_node.backoff import (
    Backoff,
    FaultLatch,
    LoopGuard,
    NodeFaults,
    is_database_unavailable,
    is_disk_full,
)
from dicom_node.db import Database
from helpers import free_port


def test_backoff_is_bounded_jittered_and_resets() -> None:
    b = Backoff(1.0, 8.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(12)]
    bases = [1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8]
    assert all(base / 2 <= d <= base for d, base in zip(delays, bases, strict=True))
    assert len({round(d, 6) for d in delays[4:]}) > 1  # jittered, not in step
    b.reset()
    assert b.next_delay() <= 1.0
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_latch_logs_once_per_state_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    seen: list[bool] = []
    latch = FaultLatch("database", "database unavailable", "database available again")
    latch.listen(lambda _latch, active: seen.append(active))
    assert latch.trip("worker", "refused")
    for _ in range(100):
        assert not latch.trip("worker", "refused")
        assert not latch.trip("exporter", "refused")
    assert not latch.clear("completion")  # never met it: cannot clear it
    assert latch.active
    assert latch.clear("exporter")
    assert not latch.clear("worker")
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len([m for m in msgs if m.startswith("database unavailable: refused")]) == 1
    assert len([m for m in msgs if m.startswith("database available again")]) == 1
    assert seen == [True, False] and latch.count == 1


def test_real_errors_are_classified(tmp_path: Path) -> None:
    db = Database(f"postgresql+psycopg2://ctmtl@127.0.0.1:{free_port()}/none")
    try:
        with pytest.raises(Exception) as refused, db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        db.dispose()
    assert is_database_unavailable(refused.value) and not is_disk_full(refused.value)

    with pytest.raises(OSError) as enospc, open("/dev/full", "wb", buffering=0) as fh:
        fh.write(b"x")  # /dev/full: every write fails with ENOSPC
    assert enospc.value.errno == errno.ENOSPC
    assert is_disk_full(enospc.value) and not is_database_unavailable(enospc.value)

    full = sqlite3.OperationalError("database or disk is full")
    assert is_disk_full(full)
    assert not is_disk_full(ValueError("x")) and not is_database_unavailable(ValueError("x"))


def test_guard_logs_other_errors_once_while_they_repeat(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    guard = LoopGuard("worker", NodeFaults(), 0.1, 0.4)
    delays = [guard.failed(RuntimeError("boom"), "worker loop error") for _ in range(20)]
    assert max(delays) <= 0.4
    assert len([r for r in caplog.records if "worker loop error" in r.getMessage()]) == 1
    guard.succeeded()
    guard.failed(RuntimeError("boom"), "worker loop error")
    assert len([r for r in caplog.records if "worker loop error" in r.getMessage()]) == 2
