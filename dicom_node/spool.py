"""The spool: received instances and produced results on local (or shared) disk.

Paths are built only from UIDs that passed `validate_uid` (digits and dots), so nothing a
peer sends can steer a write outside the spool. Writes go to a temp file in the target
folder and are renamed into place (`os.replace`), so a reader never sees half a file and a
re-sent instance replaces the old copy atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node.uids import clean_uid, uid_problem

logger = logging.getLogger(__name__)


class InvalidUID(ValueError):
    """A UID that is missing, too long or has characters other than digits and dots.

    `general` says the same without the offending value (it aggregates per series).
    """

    def __init__(self, message: str, general: str | None = None) -> None:
        super().__init__(message)
        self.general = general or message


class SpoolFull(OSError):
    """Less free space than the configured minimum: refuse before writing."""


def validate_uid(value: object, name: str = "UID") -> str:
    """Return the UID as a clean string or raise `InvalidUID` (why: it becomes a path part)."""
    problem = uid_problem(value)
    if problem is not None:
        shown = "" if value is None or problem == "empty" else f" {str(value)[:70]!r}"
        raise InvalidUID(f"{name}{shown} is {problem}", f"{name} is {problem}")
    return clean_uid(value)


@dataclass(frozen=True)
class StoredFile:
    """Where an instance landed, its size and content hash, and whether it replaced a copy."""

    path: Path
    size: int
    sha256: str
    replaced: bool


@dataclass(frozen=True)
class PendingFile:
    """A written and fsynced instance in its series folder, under a temp name."""

    path: Path  # where it goes
    temp: Path
    size: int
    sha256: str


class Spool:
    """Layout: incoming/<study>/<series>/<sop>.dcm, results/<series>/job-<id>/attempt-<n>/."""

    def __init__(self, root: Path, min_free_mb: float = 0.0) -> None:
        self.root = Path(root)
        self.min_free_mb = min_free_mb
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"

    def ensure(self) -> None:
        """Create the top folders (start-up; fails early on a read-only spool)."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.results.mkdir(parents=True, exist_ok=True)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return (
            self.incoming
            / validate_uid(study_uid, "Study Instance UID")
            / validate_uid(series_uid, "Series Instance UID")
        )

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        sop = validate_uid(sop_uid, "SOP Instance UID")
        return self.series_dir(study_uid, series_uid) / f"{sop}.dcm"

    def result_dir(self, series_uid: str, job_id: int, attempt: int | None = None) -> Path:
        """`results/<series>/job-<id>/`, or with `attempt` its `attempt-<n>/` sub-folder.

        Each claim of a job writes into its own attempt folder (why: a worker that lost its
        lease and the worker that took the job over must never write into, or remove, the
        same folder).
        """
        job_dir = self.results / validate_uid(series_uid, "Series Instance UID") / f"job-{job_id}"
        return job_dir if attempt is None else job_dir / f"attempt-{attempt}"

    def free_mb(self) -> float:
        target = self.root if self.root.exists() else self.root.parent
        return shutil.disk_usage(target).free / 2**20

    def check_space(self, needed_bytes: int = 0) -> None:
        """Raise `SpoolFull` when a write would leave less than `min_free_mb`."""
        if self.min_free_mb <= 0:
            return
        free = self.free_mb()
        if free - needed_bytes / 2**20 < self.min_free_mb:
            raise SpoolFull(
                f"spool {self.root} has {free:.0f} MiB free, minimum is {self.min_free_mb:g} MiB"
            )

    def write_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, data: bytes
    ) -> StoredFile:
        """Write one encoded instance (DICOM file format) atomically; return where it went."""
        pending = self.write_pending(study_uid, series_uid, sop_uid, (data,))
        return self.place(pending)

    def write_pending(
        self, study_uid: str, series_uid: str, sop_uid: str, parts: Sequence[bytes | memoryview]
    ) -> PendingFile:
        """Write and fsync one encoded instance next to where it goes, not yet in place.

        Why two steps: the association thread writes (the GIL is free during the write and
        the fsync) and the index writer moves it into place (`place`) in the same batch as
        its row, after checking that it may replace what is there. `parts` are written one
        after the other (the file meta, then the data set as received: no copy of the pixel
        data to join them).
        """
        path = self.instance_path(study_uid, series_uid, sop_uid)
        size = sum(len(part) for part in parts)
        self.check_space(size)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as fh:
                for part in parts:
                    fh.write(part)
                    digest.update(part)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        return PendingFile(path, Path(tmp_name), size, digest.hexdigest())

    def place(self, pending: PendingFile) -> StoredFile:
        """Move a pending file into place (`os.replace`: a reader sees the old or the new)."""
        replaced = pending.path.exists()
        os.replace(pending.temp, pending.path)
        return StoredFile(pending.path, pending.size, pending.sha256, replaced)

    def remove_stale_parts(self, older_than_s: float = 3600.0) -> int:
        """Remove the `.part` files of instances whose process died before their row was
        committed (never acknowledged, never read); a `.part` younger than `older_than_s`
        may belong to another node's receiving SCP on a shared spool and is left."""
        cutoff = time.time() - older_than_s
        removed = 0
        for part in self.incoming.glob("*/*/.*.part"):
            with contextlib.suppress(OSError):
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    removed += 1
        return removed

    def discard(self, pending: PendingFile) -> None:
        """Remove a pending file that will not be placed (refused, or its row failed)."""
        with contextlib.suppress(OSError):
            os.unlink(pending.temp)

    def remove(self, path: Path) -> None:
        """Remove a spooled file (used to undo a write whose database row failed)."""
        resolved = Path(path).resolve()
        if self.root.resolve() not in resolved.parents:
            raise ValueError(f"{path} is not inside the spool {self.root}")
        with contextlib.suppress(FileNotFoundError):
            resolved.unlink()

    def remove_tree(self, path: Path) -> None:
        """Remove a folder inside the spool (retention purge)."""
        resolved = Path(path).resolve()
        if self.root.resolve() not in resolved.parents:
            raise ValueError(f"{path} is not inside the spool {self.root}")
        shutil.rmtree(resolved, ignore_errors=True)
