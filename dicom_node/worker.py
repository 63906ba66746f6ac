"""Worker: claims queued jobs, runs the pipeline with one Predictor, queues the exports.

The Predictor (network on its device) is built once per worker and reused for every
job. A claimed job holds a lease that a background thread renews while the pipeline
runs; if the worker dies, the lease runs out and any worker (this one after a restart,
or another process sharing the database) claims the job again. A job that fails with an
error is retried after `worker.retry_delay_s` until `worker.max_attempts`; a series the
pipeline refuses (`SeriesRejected`) is not retried.

Newer results replace older ones: the pipeline writes a series' SEG and SR with the
same result Series Instance UIDs every time it processes that series (new SOP Instance
UIDs), so the PACS shows them as the same two series with the newer instances added.
The older result rows are marked `superseded` and their undelivered deliveries
cancelled; a job that finishes while a newer job of its series is already queued keeps
its files but sends nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from dicom_node.config import NodeConfig
from dicom_node.db import (
    Database,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
    claim_job,
    renew_job_lease,
    series_label,
    utcnow,
)
from dicom_node.export import queue_deliveries
from dicom_node.metrics import NodeMetrics
from dicom_node.parts import NodePart
from dicom_node.results import ResultUIDs
from dicom_node.spool import Spool
from dicom_node.volume import SeriesRejected

logger = logging.getLogger(__name__)

PredictorFactory = Callable[[], Any]


def default_owner(role: str = "worker") -> str:
    """`host:pid:role:thread`: unique per worker, readable in `status`."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}:{threading.get_ident() % 10000}"


def build_predictor(config: NodeConfig) -> Any:
    """The model from `[model]` (the shipped checkpoint when none is set)."""
    from mtl_model import Predictor

    m = config.model
    predictor = Predictor(
        checkpoint=m.checkpoint,
        device=m.device,
        precision=m.precision,
        batch_size=m.batch_size,
        compile=m.compile,
    )
    meta = predictor.metadata
    logger.info(
        "model loaded: %s version %s on %s",
        m.checkpoint or "shipped checkpoint",
        getattr(meta, "model_version", "?"),
        getattr(predictor, "device", m.device),
    )
    return predictor


class _LeaseKeeper:
    """Renews a job lease every third of its length until stopped."""

    def __init__(self, db: Database, job_id: int, owner: str, lease_seconds: float) -> None:
        self.db, self.job_id, self.owner, self.lease = db, job_id, owner, lease_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                if not renew_job_lease(self.db, self.job_id, self.owner, self.lease):
                    self.lost = True
                    logger.error("job %s: lease lost to another worker", self.job_id)
                    return
            except Exception:
                logger.exception("job %s: lease renewal failed", self.job_id)


def result_uids(source_series_uid: str) -> ResultUIDs:
    """Result series UIDs derived from the source series, fresh instance UIDs.

    Deterministic series UIDs make every (re)processing of a series land in the same SEG,
    SR and overlay series in the PACS, so newer results replace older ones there.
    """
    return ResultUIDs(
        seg_series=str(generate_uid(entropy_srcs=["ctmtl-node", source_series_uid, "seg"])),
        sr_series=str(generate_uid(entropy_srcs=["ctmtl-node", source_series_uid, "sr"])),
        sc_series=str(generate_uid(entropy_srcs=["ctmtl-node", source_series_uid, "sc"])),
    )


class Worker(NodePart):
    """One job at a time; several workers (threads or processes) may share a database."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        spool: Spool,
        predictor_factory: PredictorFactory | None = None,
        owner: str | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        super().__init__(config, db, spool, metrics)
        self.spool: Spool = spool
        self.owner = owner or default_owner()
        self._factory = predictor_factory or (lambda: build_predictor(self.config))
        self._predictor: Any = None

    @property
    def predictor(self) -> Any:
        if self._predictor is None:
            self._predictor = self._factory()
            self.metrics.set_model_loaded(True)
        return self._predictor

    def run_once(self) -> int | None:
        """Claim and process one job; return its id, or None when nothing was due."""
        wcfg = self.config.worker
        job_id = claim_job(self.db, self.owner, wcfg.lease_seconds, wcfg.max_attempts)
        if job_id is None:
            return None
        self.process(job_id)
        return job_id

    def run(self, stop: threading.Event) -> None:
        logger.info("worker %s started", self.owner)
        try:
            _ = self.predictor  # load the model before the first series arrives
        except Exception:
            logger.exception("cannot load the model; the worker will retry per job")
        while not stop.is_set():
            try:
                if self.run_once() is not None:
                    continue
            except Exception:
                logger.exception("worker loop error")
            stop.wait(self.config.worker.poll_interval_s)
        logger.info("worker %s stopped", self.owner)

    # ----------------------------------------------------------------- one job

    def process(self, job_id: int) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            series = s.get(Series, job.series_id)
            assert series is not None
            series_uid = series.series_instance_uid
            key = series_label(series_uid, series.study.study_instance_uid)
            attempt = job.attempts
            queued_at = job.created_at
            files = [
                Path(p)
                for p in s.scalars(
                    select(Instance.path)
                    .where(Instance.series_id == series.id)
                    .order_by(Instance.id)
                ).all()
            ]
            if series.state in (SeriesState.QUEUED, SeriesState.FAILED):
                series.state = SeriesState.PROCESSING
            instance_number = 1 + int(
                s.scalar(select(func.count(Result.id)).where(Result.series_id == series.id)) or 0
            )
        out_dir = self.spool.result_dir(series_uid, job_id)
        if out_dir.exists():  # a previous attempt of this job
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        logger.info(
            "job %d started (attempt %d): %s, %d instances", job_id, attempt, key, len(files)
        )

        from dicom_node.pipeline import process_series

        t0 = time.perf_counter()
        wait_s = (utcnow() - queued_at).total_seconds()
        with _LeaseKeeper(self.db, job_id, self.owner, self.config.worker.lease_seconds) as lease:
            try:
                result = process_series(
                    files,
                    out_dir,
                    self.predictor,
                    self.config.results,
                    uids=result_uids(series_uid),
                    instance_number=instance_number,
                )
            except SeriesRejected as exc:
                self._finish_rejected(job_id, key, exc.reason)
                self.metrics.series_refused()
                return
            except Exception as exc:
                logger.debug("job %d: processing failed", job_id, exc_info=True)
                error = f"{type(exc).__name__}: {exc}"
                self._finish_error(job_id, key, error, traceback.format_exc())
                return
        if lease.lost:
            logger.warning(
                "job %d: %s: finished after losing its lease; result discarded", job_id, key
            )
            return
        timings = {k: round(float(v), 4) for k, v in dict(result.timings).items()}
        timings["total"] = round(time.perf_counter() - t0, 4)
        timings["queue_wait"] = round(wait_s, 4)
        self._finish_done(job_id, key, result, result_uids(series_uid), timings)
        self.metrics.series_done(timings)

    def _own(self, job: Job | None) -> bool:
        return job is not None and job.state == JobState.RUNNING and job.lease_owner == self.owner

    def _finish_done(
        self, job_id: int, key: str, result: Any, uids: ResultUIDs, timings: dict[str, float]
    ) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if not self._own(job):
                logger.warning("job %d: %s: job no longer ours; result discarded", job_id, key)
                return
            assert job is not None
            series = s.get(Series, job.series_id)
            assert series is not None
            newer = s.scalars(
                select(Job.id).where(
                    Job.series_id == series.id,
                    Job.id > job_id,
                    Job.state.in_((JobState.QUEUED, JobState.RUNNING)),
                )
            ).first()
            row = Result(
                job_id=job_id,
                series_id=series.id,
                covid_probability=float(result.covid_probability),
                lesion_volume_ml=float(result.lesion_volume_ml),
                lung_volume_ml=_opt_float(result.lung_volume_ml),
                lung_involvement_percent=_opt_float(result.lung_involvement_percent),
                seg_path=str(result.seg_path),
                sr_path=str(result.sr_path),
                extra_paths=[str(p) for p in (result.extra_paths or [])],
                seg_series_uid=uids.seg_series,
                seg_sop_instance_uid=str(result.seg_sop_instance_uid),
                sr_series_uid=uids.sr_series,
                sr_sop_instance_uid=str(result.sr_sop_instance_uid),
                model_version=str(result.model_version),
                superseded=newer is not None,
            )
            s.add(row)
            s.flush()
            job.state = JobState.DONE
            job.finished_at = utcnow()
            job.timings = timings
            job.error = None
            job.lease_owner = None
            job.lease_expires_at = None
            destinations: list[Any] = []
            problems: list[str] = []
            if newer is None:
                older = list(
                    s.scalars(
                        select(Result.id).where(
                            Result.series_id == series.id,
                            Result.id != row.id,
                            Result.superseded.is_(False),
                        )
                    ).all()
                )
                if older:
                    s.execute(update(Result).where(Result.id.in_(older)).values(superseded=True))
                    s.execute(
                        update(Delivery)
                        .where(
                            Delivery.result_id.in_(older),
                            Delivery.state == DeliveryState.PENDING,
                        )
                        .values(state=DeliveryState.CANCELLED, last_error="superseded")
                    )
                destinations, problems = self.config.route(series.calling_ae)
                queue_deliveries(s, row, destinations)
            if series.state == SeriesState.PROCESSING:
                series.state = SeriesState.DONE
                series.reason = "; ".join(problems) if problems else None
            result_id = row.id
        if newer is not None:
            sending = "superseded by a newer job: not sent"
        else:
            sending = f"sending to {', '.join(d.name for d in destinations) or 'no destination'}"
        logger.info(
            "job %d done: %s covid_probability=%.4f lesion_volume_ml=%.2f "
            "lung_volume_ml=%s lung_involvement_percent=%s result=%d timings=%s; %s",
            job_id,
            key,
            float(result.covid_probability),
            float(result.lesion_volume_ml),
            _fmt(result.lung_volume_ml),
            _fmt(result.lung_involvement_percent),
            result_id,
            timings,
            sending,
        )
        for problem in problems:
            logger.warning(
                "job %d: %s: %s; results kept in %s", job_id, key, problem, result.seg_path
            )

    def _finish_rejected(self, job_id: int, key: str, reason: str) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if not self._own(job):
                return
            assert job is not None
            job.state = JobState.REJECTED
            job.error = reason
            job.finished_at = utcnow()
            job.lease_owner = None
            series = s.get(Series, job.series_id)
            assert series is not None
            if series.state == SeriesState.PROCESSING:
                series.state = SeriesState.REJECTED
                series.reason = reason
        logger.info("job %d: %s rejected: %s", job_id, key, reason)

    def _finish_error(self, job_id: int, key: str, error: str, trace: str) -> None:
        import datetime as dt

        wcfg = self.config.worker
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if not self._own(job):
                return
            assert job is not None
            job.error = error
            job.lease_owner = None
            job.lease_expires_at = None
            series = s.get(Series, job.series_id)
            assert series is not None
            if job.attempts < wcfg.max_attempts:
                job.state = JobState.QUEUED
                job.not_before = utcnow() + dt.timedelta(seconds=wcfg.retry_delay_s)
                if series.state == SeriesState.PROCESSING:
                    series.state = SeriesState.QUEUED
                logger.warning(
                    "job %d failed (attempt %d/%d), retry in %.0f s: %s: %s",
                    job_id,
                    job.attempts,
                    wcfg.max_attempts,
                    wcfg.retry_delay_s,
                    key,
                    error,
                )
            else:
                job.state = JobState.FAILED
                job.finished_at = utcnow()
                if series.state == SeriesState.PROCESSING:
                    series.state = SeriesState.FAILED
                    series.reason = f"processing failed: {error}"
                logger.error("job %d failed for good: %s: %s\n%s", job_id, key, error, trace)
                self.metrics.series_given_up()


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _fmt(value: Any) -> str:
    return "none" if value is None else f"{float(value):.2f}"
