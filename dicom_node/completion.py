"""Series completion: idle series -> selection rules + geometry checks -> job or reason.

DICOM has no "end of series" message, so a series counts as complete once no instance
has arrived for `completion.idle_seconds`. Its headers (no pixel data) are then checked
against the selection rules and `dicom_node.volume.check_geometry`; a failing series gets
state `rejected` and its reason (stored and logged), a passing one gets a queued job.

The state change is a compare-and-set on (state, last_received_at, n_instances), so an
instance that arrives while the headers are being read leaves the series `receiving` and
it is judged again later. When a series gets a new job, older jobs of it that have not
started are marked `superseded`; a running one finishes, and its results are then
replaced by the newer job's (see `dicom_node.worker`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import and_, or_, select, update

from dicom_node.backoff import is_database_unavailable, is_disk_full
from dicom_node.db import (
    Database,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
    refusal_summary,
    series_label,
    utcnow,
)
from dicom_node.parts import NodePart
from dicom_node.selection import evaluate
from dicom_node.spool import Spool
from dicom_node.volume import check_geometry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompletionOutcome:
    """What happened to one idle series."""

    series_uid: str
    accepted: bool
    reason: str | None
    job_id: int | None


def read_headers(paths: list[str]) -> list[Dataset]:
    """Headers of the spooled instances (pixel data skipped)."""
    out: list[Dataset] = []
    for path in paths:
        out.append(pydicom.dcmread(path, stop_before_pixels=True))
    return out


class CompletionMonitor(NodePart):
    """Finds idle series and decides about them; `run()` loops until stopped.

    `CompletionMonitor(config, db, spool=None, metrics=None)`: without a spool, finished
    series are never purged.
    """

    _last_purge: dt.datetime | None = None  # set per instance by `_maybe_purge`

    def idle_series(self, now: dt.datetime) -> list[int]:
        """Series quiet for `idle_seconds`, or for `interrupted_idle_seconds` when their last
        association was aborted or dropped (a cut-off transfer is likely to be resent), and
        with no open association that delivered instances of them (it may send more, e.g.
        after a database outage that refused some of its instances)."""
        cfg = self.config.completion
        cutoff = now - dt.timedelta(seconds=cfg.idle_seconds)
        cutoff_interrupted = now - dt.timedelta(seconds=cfg.interrupted_idle_seconds)
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Series.id)
                    .where(
                        Series.state == SeriesState.RECEIVING,
                        or_(  # an association still delivering: not complete
                            Series.association_open_until.is_(None),
                            Series.association_open_until <= now,
                        ),
                        or_(
                            and_(
                                Series.receive_interrupted.is_(None),
                                Series.last_received_at <= cutoff,
                            ),
                            and_(
                                Series.receive_interrupted.is_not(None),
                                Series.last_received_at <= cutoff_interrupted,
                            ),
                        ),
                    )
                    .order_by(Series.last_received_at)
                ).all()
            )

    def check_once(self, now: dt.datetime | None = None) -> list[CompletionOutcome]:
        """Judge every series that is idle at `now`."""
        now = now or utcnow()
        outcomes = []
        for series_id in self.idle_series(now):
            try:
                outcome = self.complete(series_id)
            except Exception as exc:  # one bad series must not stop the others
                if is_database_unavailable(exc) or is_disk_full(exc):
                    raise  # not this series' fault: the loop backs off (logged once)
                logger.exception("completion of series row %s failed", series_id)
                continue
            if outcome is not None:
                outcomes.append(outcome)
        self._maybe_purge(now)
        return outcomes

    def complete(self, series_id: int) -> CompletionOutcome | None:
        with self.db.session() as s:
            series = s.get(Series, series_id)
            if series is None or series.state != SeriesState.RECEIVING:
                return None
            seen_at, seen_n = series.last_received_at, series.n_instances
            uid = series.series_instance_uid
            key = series_label(uid, series.study.study_instance_uid)
            refused = refusal_summary(series.refusals)
            interrupted = series.receive_interrupted
            paths = list(
                s.scalars(
                    select(Instance.path)
                    .where(Instance.series_id == series_id)
                    .order_by(Instance.id)
                ).all()
            )

        if interrupted:
            logger.warning("%s: judged after its last association was %s", key, interrupted)
        reasons = self._judge(uid, paths) if paths else ["no instance was accepted"]
        if refused:
            if reasons:
                reasons.append(refused)
            else:
                logger.warning("%s: %s", key, refused)
        with self.db.session() as s:
            values: dict[str, object] = {
                "state": SeriesState.REJECTED if reasons else SeriesState.QUEUED,
                "reason": "; ".join(reasons) if reasons else None,
            }
            res = s.execute(
                update(Series)
                .where(
                    Series.id == series_id,
                    Series.state == SeriesState.RECEIVING,
                    Series.last_received_at == seen_at,
                    Series.n_instances == seen_n,
                )
                .values(**values, updated_at=utcnow())
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                logger.debug("%s changed while being checked; judged again later", key)
                return None
            if reasons:
                logger.info("%s rejected: %s", key, "; ".join(reasons))
                self.metrics.series_refused()
                return CompletionOutcome(uid, False, "; ".join(reasons), None)
            superseded = s.execute(
                update(Job)
                .where(Job.series_id == series_id, Job.state == JobState.QUEUED)
                .values(state=JobState.SUPERSEDED, finished_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]
            job = Job(series_id=series_id, state=JobState.QUEUED, n_instances=seen_n, attempts=0)
            s.add(job)
            s.flush()
            job_id = job.id
        logger.info(
            "%s complete: %d instances, job %d queued%s",
            key,
            seen_n,
            job_id,
            f" (superseding {superseded} queued job(s))" if superseded else "",
        )
        return CompletionOutcome(uid, True, None, job_id)

    def _judge(self, series_uid: str, paths: list[str]) -> list[str]:
        try:
            headers = read_headers(paths)
        except Exception as exc:  # unreadable spool file: say which
            return [f"cannot read a spooled instance: {exc}"]
        decision = evaluate(headers, self.config.selection)
        if not decision.accepted:
            return decision.reasons
        problems = check_geometry(headers)
        return [f"geometry: {p}" for p in problems]

    # ----------------------------------------------------------------- retention

    def _maybe_purge(self, now: dt.datetime) -> None:
        days = self.config.spool.retention_days
        if self.spool is None or days is None:
            return
        if self._last_purge is not None and now - self._last_purge < dt.timedelta(hours=1):
            return
        self._last_purge = now
        purge_finished(self.db, self.spool, now - dt.timedelta(days=days))

    def run(self, stop: threading.Event) -> None:
        interval = self.config.completion.poll_interval_s
        logger.info("completion monitor started (idle %.1f s)", self.config.completion.idle_seconds)
        guard = self.loop_guard("completion")
        while not stop.is_set():
            guard.configure(self.config.backoff.initial_s, self.config.backoff.max_s)
            try:
                self.check_once()
                guard.succeeded()
            except Exception as exc:  # database unavailable, disk full, ...: back off
                stop.wait(guard.failed(exc, "completion check failed"))
                continue
            stop.wait(interval)
        logger.info("completion monitor stopped")


def purge_finished(db: Database, spool: Spool, older_than: dt.datetime) -> int:
    """Delete spooled files of finished series last touched before `older_than`.

    Rows stay (they are the audit trail); `purged_at` is set. Returns series purged.
    """
    final = (SeriesState.DONE, SeriesState.REJECTED, SeriesState.FAILED)
    with db.session() as s:
        rows = s.execute(
            select(Series.id, Series.series_instance_uid, Study.study_instance_uid, Instance.path)
            .join(Study, Study.id == Series.study_id)
            .join(Instance, Instance.series_id == Series.id)
            .where(
                Series.state.in_(final),
                Series.purged_at.is_(None),
                Series.last_received_at < older_than,
            )
        ).all()
    by_series: dict[int, tuple[str, str, list[str]]] = {}
    for sid, uid, study_uid, path in rows:
        by_series.setdefault(sid, (uid, study_uid, []))[2].append(path)
    for sid, (uid, study_uid, paths) in by_series.items():
        folders = {Path(p).parent for p in paths}
        for folder in folders:
            spool.remove_tree(folder)
        spool.remove_tree(spool.results / uid)
        with db.session() as s:
            s.execute(update(Series).where(Series.id == sid).values(purged_at=utcnow()))
        logger.info("%s: spooled files purged (retention)", series_label(uid, study_uid))
    return len(by_series)
