"""Backing off when the node's surroundings fail: a database outage, a full disk.

Each polling loop of a node process (completion, worker, exporter) has a `LoopGuard`.
After an error the loop waits `backoff.initial_s`, doubling up to `backoff.max_s`, with
jitter (so several loops and processes do not retry in step), instead of its poll
interval; the first iteration that works again resets it.

The conditions themselves are `FaultLatch`es shared by all loops of one process (one set
per `Database` object, `faults_for`): the first loop that meets an outage logs one line
("database unavailable: ...") and counts it in the metrics; the loops stay quiet while it
lasts (the traceback is logged at DEBUG only); the loop that met it logs one line when it
works again ("database available again after 42 s"). A latch is cleared only by a loop
that met the fault, so a loop that merely reads never clears a "disk full" that a
writing loop still meets. Errors of any other kind are logged with their traceback once,
then at DEBUG while the same error repeats.
"""

from __future__ import annotations

import errno
import logging
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: sqlite3 result code "database or disk is full"
_SQLITE_FULL = 13
#: PostgreSQL SQLSTATE disk_full
_PG_DISK_FULL = "53100"
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}

Listener = Callable[["FaultLatch", bool], None]


class Backoff:
    """Bounded exponential backoff with jitter: `next_delay()` after each failure.

    The n-th delay in a row is `min(max_s, initial_s * factor**(n-1))`, shortened by up to
    `jitter` (a fraction) at random; `reset()` after a success.
    """

    def __init__(
        self,
        initial_s: float = 1.0,
        max_s: float = 60.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s, factor >= 1, 0 <= jitter < 1")
        self.initial_s, self.max_s, self.factor, self.jitter = initial_s, max_s, factor, jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        base = min(self.max_s, self.initial_s * self.factor**self.failures)
        self.failures += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.failures = 0


class FaultLatch:
    """One condition of the process (database unavailable, disk full), on or off.

    `trip()` and `clear()` log only when the state changes, and tell the listeners (the
    metrics of each part that watches it). Thread-safe.
    """

    def __init__(self, name: str, begin: str, end: str, level: int = logging.ERROR) -> None:
        self.name, self.begin, self.end, self.level = name, begin, end, level
        self.count = 0  # times it went on
        self.detail: str | None = None
        self.since: float | None = None  # time.time() when it went on
        self._sources: set[str] = set()
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.since is not None

    def listen(self, listener: Listener) -> None:
        """Call `listener(latch, active)` on every change (once per listener)."""
        with self._lock:
            if listener not in self._listeners:
                self._listeners.append(listener)

    def trip(self, source: str, detail: str, exc: BaseException | None = None) -> bool:
        """`source` (a loop's name) meets the fault; True when this turned the latch on."""
        with self._lock:
            self._sources.add(source)
            if self.since is not None:
                if exc is not None:
                    logger.debug("%s (%s): %s", self.begin, source, detail, exc_info=exc)
                return False
            self.since = time.time()
            self.detail = detail
            self.count += 1
            listeners = list(self._listeners)
        logger.log(self.level, "%s: %s (%s); retrying with backoff", self.begin, detail, source)
        if exc is not None:
            logger.debug("%s: traceback", self.begin, exc_info=exc)
        for listener in listeners:
            listener(self, True)
        return True

    def clear(self, source: str | None = None) -> bool:
        """The fault is gone, as seen by `source` (None: whoever); True when it was on.

        A source that never met the fault cannot clear it.
        """
        with self._lock:
            if self.since is None or (source is not None and source not in self._sources):
                return False
            seconds = time.time() - self.since
            self.since = None
            self.detail = None
            self._sources.clear()
            listeners = list(self._listeners)
        logger.info("%s (after %.0f s)", self.end, seconds)
        for listener in listeners:
            listener(self, False)
        return True

    def describe(self) -> str:
        """For /readyz: what is wrong and since when, or "ok"."""
        since, detail = self.since, self.detail
        if since is None:
            return "ok"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        return f"{self.begin} since {stamp}: {detail}"


@dataclass
class NodeFaults:
    """The latches all loops of one process share."""

    database: FaultLatch = field(
        default_factory=lambda: FaultLatch(
            "database", "database unavailable", "database available again"
        )
    )
    disk: FaultLatch = field(
        default_factory=lambda: FaultLatch(
            "disk_full", "cannot write results: disk full", "results can be written again"
        )
    )

    def __iter__(self) -> Iterator[FaultLatch]:
        return iter((self.database, self.disk))

    def readiness(self) -> tuple[bool, str]:
        """A readiness check: ok while no latch is on."""
        on = [latch.describe() for latch in self if latch.active]
        return (not on), "; ".join(on) or "no database outage, disk not full"


_FAULTS: weakref.WeakKeyDictionary[object, NodeFaults] = weakref.WeakKeyDictionary()
_FAULTS_LOCK = threading.Lock()


def faults_for(db: object) -> NodeFaults:
    """The latches of the process part(s) that use `db` (one `dicom_node.db.Database`)."""
    with _FAULTS_LOCK:
        try:
            faults = _FAULTS.get(db)
            if faults is None:
                faults = _FAULTS[db] = NodeFaults()
        except TypeError:  # not weak-referenceable (None in a test): latches of its own
            return NodeFaults()
        return faults


# --------------------------------------------------------------------------- classifying


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and the DBAPI error SQLAlchemy wraps (`.orig`)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)
        todo += [e.__cause__, e.__context__, orig if isinstance(orig, BaseException) else None]


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain, or the database says its disk is full."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(e, sqlite3.OperationalError) and (
            getattr(e, "sqlite_errorcode", None) == _SQLITE_FULL
            or "database or disk is full" in str(e)
        ):
            return True
        if getattr(e, "pgcode", None) == _PG_DISK_FULL:
            return True
    return False


def is_database_unavailable(exc: BaseException) -> bool:
    """The database cannot be reached or used now (connection refused or lost, timeout)."""
    from sqlalchemy import exc as sa_exc

    for e in _chain(exc):
        if isinstance(
            e,
            sa_exc.OperationalError
            | sa_exc.InterfaceError
            | sa_exc.DisconnectionError
            | sa_exc.TimeoutError,
        ):
            return True
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return True
    return False


def describe(exc: BaseException) -> str:
    """One line for the log: the first line of the innermost DBAPI / OS error."""
    orig = getattr(exc, "orig", None)
    inner = orig if isinstance(orig, BaseException) else exc
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------- loops


class LoopGuard:
    """What one polling loop does with an error: classify, latch, back off.

    `failed(exc, what)` returns how long to wait before the next iteration;
    `succeeded()` after an iteration that worked (it did reach the database).
    """

    def __init__(
        self,
        name: str,
        faults: NodeFaults,
        initial_s: float = 1.0,
        max_s: float = 60.0,
        log: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.faults = faults
        self.backoff = Backoff(initial_s, max_s)
        self._log = log or logger
        self._last_error: str | None = None

    def configure(self, initial_s: float, max_s: float) -> None:
        """New bounds (config reloaded); the failure count is kept."""
        self.backoff.initial_s, self.backoff.max_s = initial_s, max(initial_s, max_s)

    def failed(self, exc: BaseException, what: str) -> float:
        if is_disk_full(exc):
            self.faults.disk.trip(self.name, describe(exc), exc)
        elif is_database_unavailable(exc):
            self.faults.database.trip(self.name, describe(exc), exc)
        else:
            key = f"{type(exc).__name__}: {exc}"
            if key != self._last_error:
                self._log.error("%s: %s", what, key, exc_info=exc)
                self._last_error = key
            else:
                self._log.debug("%s again: %s", what, key)
        return self.backoff.next_delay()

    def succeeded(self, disk: bool = True) -> None:
        """The iteration worked: reset the backoff, clear what this loop had met.

        `disk=False` when the iteration wrote nothing, so it says nothing about space.
        """
        self.backoff.reset()
        self._last_error = None
        self.faults.database.clear(self.name)
        if disk:
            self.faults.disk.clear(self.name)
