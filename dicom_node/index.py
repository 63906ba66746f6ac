"""Group commit of received instances: the files of many C-STOREs put in place and their
rows committed in one transaction.

Why: each C-STORE used to open two write transactions of its own (the duplicate check and
the row) through ORM sessions. Ten concurrent associations queued on SQLite's write lock,
spent the GIL in the ORM and paid one fsync of the WAL each; ingest stopped at about
45 MiB/s on two cores. Now the association threads parse, write and fsync their files side
by side (the GIL is free during the write, the hash and the fsync) and hand the row to
`IndexWriter`: whichever thread commits takes every row that queued up meanwhile, checks
each SOP Instance UID against what is stored, moves the accepted files into place and
commits all their rows at once. An association thread returns only after the commit of
its own row, before the C-STORE is answered, so nothing acknowledged is lost on a crash; a
file whose row did not commit is removed (or stays a `.part` file, never read, if the
process dies first).

A batch that fails (a concurrent insert on a shared database, a conflict found only in the
transaction) is retried one instance at a time, so that every instance gets its own
answer, as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.exc import IntegrityError

from dicom_node.db import (
    Database,
    IngestOutcome,
    InstanceConflict,
    InstanceRecord,
    KnownInstance,
    record_instances,
    stored_instances,
    utcnow,
)
from dicom_node.spool import PendingFile, Spool, StoredFile

logger = logging.getLogger(__name__)

#: Rows committed together at most (a batch is what queued while the last one committed).
MAX_BATCH = 64
_RETRIES = 3


def image_identity(ds: Dataset) -> tuple[object, ...]:
    """What tells two images of one series apart (a re-sent correction keeps it)."""
    ipp = ds.get("ImagePositionPatient")
    try:
        pos = tuple(round(float(v), 2) for v in ipp) if ipp is not None else None
    except (TypeError, ValueError):
        pos = None
    return (str(ds.get("InstanceNumber", "") or ""), pos)


@dataclass(eq=False)
class _Item:
    record: InstanceRecord
    pending: PendingFile
    identity: Callable[[], tuple[object, ...]]  # read only on a changed re-send
    wake: threading.Event = field(default_factory=threading.Event)  # answered, or to lead
    lead: bool = False
    outcome: tuple[IngestOutcome, StoredFile] | None = None
    error: Exception | None = None

    @property
    def answered(self) -> bool:
        return self.outcome is not None or self.error is not None


class IndexWriter:
    """Group commit for the storage SCP's association threads (`submit` blocks).

    No thread of its own (leader and followers): a thread that submits while no commit is
    running commits its own row at once, so one association pays no hand-over between
    threads; rows submitted during a commit wait, and the first of them then commits all
    of them in one transaction (at most `max_batch`) and answers the others.
    """

    def __init__(self, db: Database, spool: Spool, max_batch: int = MAX_BATCH) -> None:
        self.db = db
        self.spool = spool
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._waiting: list[_Item] = []
        self._busy = False  # a thread is committing (or about to)
        self.batches = 0
        self.rows = 0

    def submit(
        self,
        record: InstanceRecord,
        pending: PendingFile,
        identity: Callable[[], tuple[object, ...]],
    ) -> tuple[IngestOutcome, StoredFile]:
        """Place the pending file and commit its row; return once both are durable.

        Raises `InstanceConflict` (the file is discarded) or the database's error (the file
        is removed).
        """
        item = _Item(record, pending, identity)
        with self._lock:
            self._waiting.append(item)
            item.lead = not self._busy
            self._busy = True
        if not item.lead:
            item.wake.wait()
        if not item.answered:  # woken to lead: its own row is first in the batch
            self._lead()
        if item.error is not None:
            raise item.error
        if item.outcome is None:
            raise RuntimeError("the index writer gave no answer")
        return item.outcome

    def _lead(self) -> None:
        """Commit one batch, then hand the lead to the first row that queued meanwhile."""
        with self._lock:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: len(batch)]
        try:
            self._commit(batch)
        finally:
            with self._lock:
                successor = self._waiting[0] if self._waiting else None
                self._busy = successor is not None
                if successor is not None:
                    successor.lead = True
            if successor is not None:
                successor.wake.set()

    def _commit(self, batch: list[_Item]) -> None:
        """Every item of the batch ends answered (outcome or error), whatever happens."""
        try:
            self._write(batch)
            self.batches += 1
            self.rows += len(batch)
        except Exception as exc:  # retried alone: each instance gets its own answer
            if len(batch) > 1:
                logger.debug("batch of %d rows failed (%s); one at a time", len(batch), exc)
            for item in batch:
                try:
                    self._commit_alone(item, first_error=exc if len(batch) == 1 else None)
                except Exception as alone:  # never leave a C-STORE waiting
                    logger.exception("index writer failed")
                    item.error = alone
        finally:
            for item in batch:
                item.wake.set()

    def _commit_alone(self, item: _Item, first_error: Exception | None) -> None:
        """One instance in its own transaction, retried after a concurrent insert."""
        error = first_error
        for _ in range(_RETRIES):
            if error is not None and not isinstance(error, IntegrityError):
                break
            if error is not None:
                logger.debug("retrying instance row after a concurrent insert: %s", error)
            try:
                self._write([item])
                return
            except Exception as exc:
                error = exc
        item.error = error
        self.spool.discard(item.pending)

    def _write(self, batch: Sequence[_Item]) -> None:
        """One transaction: judge each instance against the stored ones, place the files of
        those accepted, add their rows. On failure the files it placed anew are removed."""
        placed: list[tuple[_Item, StoredFile]] = []
        refused: list[tuple[_Item, str]] = []
        now = utcnow()
        try:
            with self.db.transaction() as conn:
                rows = stored_instances(conn, {i.record.sop_uid for i in batch})
                known = {
                    uid: KnownInstance(row["series_uid"], row["path"], row["sha256"])
                    for uid, row in rows.items()
                }
                for item in batch:
                    rec = item.record
                    why = _conflict(known.get(rec.sop_uid), item)
                    if why is not None:
                        refused.append((item, why))
                        continue
                    placed.append((item, self.spool.place(item.pending)))
                    known[rec.sop_uid] = KnownInstance(rec.series_uid, rec.path, rec.sha256)
                outcomes = record_instances(conn, [i.record for i, _ in placed], now, rows)
        except BaseException:
            for _, stored in placed:
                if not stored.replaced:
                    with contextlib.suppress(OSError):
                        self.spool.remove(stored.path)
            raise
        for item, why in refused:
            self.spool.discard(item.pending)
            item.error = InstanceConflict(why)
        for (item, stored), outcome in zip(placed, outcomes, strict=True):
            item.outcome = (outcome, stored)


def _conflict(known: KnownInstance | None, item: _Item) -> str | None:
    """Why this SOP Instance UID cannot be stored, decided before its file is placed.

    The UID already names an instance of another series, or another image (another
    Instance Number or position) of this series: both are refused, so an earlier series
    is never repointed and no slice silently replaces another. A changed copy of the
    same image (a corrected re-send) replaces the old one.
    """
    if known is None:
        return None
    if known.series_uid != item.record.series_uid:
        return f"SOP Instance UID already belongs to series {known.series_uid}"
    if known.sha256 == item.record.sha256:
        return None
    try:
        old = pydicom.dcmread(
            known.path,
            stop_before_pixels=True,
            specific_tags=["InstanceNumber", "ImagePositionPatient"],
        )
    except Exception:  # the old copy is unreadable: the new one replaces it
        return None
    if image_identity(old) != item.identity():
        number = str(old.get("InstanceNumber", "") or "?")
        return f"SOP Instance UID already names another image of this series (instance {number})"
    return None
