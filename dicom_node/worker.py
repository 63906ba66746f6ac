"""Worker: claims queued jobs, runs the pipeline with one Predictor, queues the exports.

The Predictor (network on its device) is built once per worker and reused for every
job. A claimed job holds a lease that a background thread renews while the pipeline
runs; if the worker dies, the lease runs out and any worker (this one after a restart,
or another process sharing the database) claims the job again. A job that fails with an
error is retried after `worker.retry_delay_s` until `worker.max_attempts`; a series the
pipeline refuses (`SeriesRejected`) is not retried. Error texts and tracebacks are stored
(`job.error`, `series.reason`) and logged only after `dicom_node.scrub.scrub` removed the
series' identifying values from them. A job whose results cannot be written because the
disk is full goes back to the queue without using up an attempt; the worker logs that
once, backs off (`dicom_node.backoff`) and claims again once a probe write into the
spool's results folder works.

A worker that lost its lease (it was frozen or cut off from the database for longer than
the lease, and another worker took the job over) stops as soon as it notices: the lease
is confirmed with the database after loading, after inference (before anything is
written) and before the result is recorded, and the result row is written under a row
lock on the job. Each claim writes into its own attempt folder
(`results/<series>/job-<id>/attempt-<n>/`); the loser removes its folder and records and
sends nothing, and a later claim removes the folders of earlier attempts of its job.

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
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from dicom_node.backoff import describe, faults_for, is_database_unavailable, is_disk_full
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
from dicom_node.scrub import identifying_values, scrub
from dicom_node.spool import Spool
from dicom_node.volume import SeriesRejected, decode_pool

logger = logging.getLogger(__name__)

PredictorFactory = Callable[[], Any]

#: While the disk is full the worker writes this much as a probe before it claims a job.
SPACE_PROBE_BYTES = 256 * 1024


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
        engine=m.engine,
    )
    meta = predictor.metadata
    logger.info(
        "model loaded: %s version %s on %s",
        m.checkpoint or "shipped checkpoint",
        getattr(meta, "model_version", "?"),
        getattr(predictor, "device", m.device),
    )
    return predictor


class LeaseLost(Exception):
    """Another worker owns the job now; raised at the stage boundary where it was noticed."""

    def __init__(self, job_id: int, stage: str) -> None:
        super().__init__(f"job {job_id}: lease lost to another worker after stage {stage}")
        self.stage = stage


class _LeaseKeeper:
    """Renews a job lease every third of its length until stopped; `check` at each stage."""

    def __init__(self, db: Database, job_id: int, owner: str, lease_seconds: float) -> None:
        self.db, self.job_id, self.owner, self.lease = db, job_id, owner, lease_seconds
        self.lost = False
        #: the last stage after which the lease was confirmed ("claim" before the first)
        self.stage = "claim"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """No more renewals (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def confirm(self) -> bool:
        """Whether the job is still ours, asked of the database now (renewing the lease).

        A database error counts as "still ours": it cannot be told now, and the result
        is recorded only under a row lock that checks the owner again.
        """
        if self.lost:
            return False
        try:
            if renew_job_lease(self.db, self.job_id, self.owner, self.lease):
                return True
        except Exception:
            logger.debug("job %s: lease not confirmed", self.job_id, exc_info=True)
            return not self.lost
        self.lost = True
        return False

    def check(self, stage: str) -> None:
        """Between pipeline stages: raise `LeaseLost` once another worker owns the job."""
        if not self.confirm():
            raise LeaseLost(self.job_id, stage)
        self.stage = stage

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                if not renew_job_lease(self.db, self.job_id, self.owner, self.lease):
                    self.lost = True
                    logger.warning(
                        "job %s: lease lost to another worker (renewal refused)", self.job_id
                    )
                    return
                faults_for(self.db).database.clear("lease")
            except Exception as exc:
                if is_database_unavailable(exc):  # logged once per outage
                    faults_for(self.db).database.trip("lease", describe(exc), exc)
                else:
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
        self._decode_pool: Executor | None = None
        self._decode_pool_made = False

    @property
    def predictor(self) -> Any:
        if self._predictor is None:
            self._predictor = self._factory()
            self.metrics.set_model_loaded(True)
        return self._predictor

    @property
    def decode_executor(self) -> Executor | None:
        """The decoding processes (``[worker] decode_workers``), started with the first
        series and kept, so no series pays their start-up but the first."""
        if not self._decode_pool_made:
            self._decode_pool_made = True
            self._decode_pool = decode_pool(self.config.worker.decode_workers)
        return self._decode_pool

    def close(self) -> None:
        """Stop the decoding processes (the worker loop does this when it ends)."""
        pool, self._decode_pool, self._decode_pool_made = self._decode_pool, None, False
        if pool is not None:
            pool.shutdown(cancel_futures=True)

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
        _ = self.decode_executor  # and start the decoding processes
        guard = self.loop_guard("worker")
        try:
            while not stop.is_set():
                guard.configure(self.config.backoff.initial_s, self.config.backoff.max_s)
                try:
                    if self.faults.disk.active and not self.space_for_results():
                        stop.wait(guard.backoff.next_delay())  # still full: claim nothing
                        continue
                    job_id = self.run_once()
                    guard.succeeded()
                    if job_id is not None:
                        continue
                except Exception as exc:  # database unavailable, disk full, ...: back off
                    stop.wait(guard.failed(exc, "worker loop error"))
                    continue
                stop.wait(self.config.worker.poll_interval_s)
        finally:
            self.close()
        logger.info("worker %s stopped", self.owner)

    def space_for_results(self) -> bool:
        """Whether a probe file can be written into the spool's results folder now."""
        folder = self.spool.results
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".space-probe.", dir=folder)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(b"\0" * SPACE_PROBE_BYTES)
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                os.unlink(name)
        except OSError as exc:
            if is_disk_full(exc):
                return False
            raise
        return True

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
        job_dir = self.spool.result_dir(series_uid, job_id)
        out_dir = self.spool.result_dir(series_uid, job_id, attempt)
        try:
            self._remove_earlier_attempts(job_dir, out_dir)
            if out_dir.exists():  # this attempt number was handed back (disk full) before
                shutil.rmtree(out_dir)
            out_dir.mkdir(parents=True)
        except OSError as exc:
            if is_disk_full(exc):
                self._hand_back_disk_full(job_id, key, out_dir, exc)
            raise
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
                    decode_workers=self.decode_executor or 0,
                    after_stage=lease.check,
                )
                lease.check("write")  # before recording: nothing is recorded for a lost job
            except LeaseLost as exc:
                lease.stop()
                self._drop_lost(job_id, key, out_dir, exc.stage)
                return
            except SeriesRejected as exc:  # texts stored and logged: no demographics
                reason = scrub(exc.reason, identifying_values(files))
                if self._finish_rejected(job_id, key, reason):
                    self.metrics.series_refused()
                else:
                    self._drop_lost(job_id, key, out_dir, lease.stage)
                return
            except Exception as exc:
                if is_disk_full(exc):  # not the series' fault: the loop waits for space
                    lease.stop()  # before the job is handed back, so no renewal races it
                    self._hand_back_disk_full(job_id, key, out_dir, exc)
                    raise
                values = identifying_values(files)  # texts stored and logged: no demographics
                trace = scrub(traceback.format_exc(), values)
                logger.debug("job %d: processing failed\n%s", job_id, trace)
                error = scrub(f"{type(exc).__name__}: {exc}", values)
                if not self._finish_error(job_id, key, error, trace):
                    self._drop_lost(job_id, key, out_dir, lease.stage)
                return
        timings = {k: round(float(v), 4) for k, v in dict(result.timings).items()}
        timings["total"] = round(time.perf_counter() - t0, 4)
        timings["queue_wait"] = round(wait_s, 4)
        if not self._finish_done(job_id, key, result, result_uids(series_uid), timings):
            self._drop_lost(job_id, key, out_dir, "write")
            return
        self.metrics.series_done(timings)

    def _remove_earlier_attempts(self, job_dir: Path, out_dir: Path) -> None:
        """What earlier claims of this job left (a failed attempt, a worker that was lost).

        A lost worker that is still running removes its own folder when it notices; one
        that died cannot, so the next claim does. Nothing in the job folder belongs to a
        recorded result: a job with a result is done and never claimed again.
        """
        if not job_dir.is_dir():
            return
        for old in job_dir.iterdir():
            if old.name == out_dir.name:
                continue
            if old.is_dir():
                self.spool.remove_tree(old)
            else:  # results of a job claimed before attempt folders existed
                self.spool.remove(old)
            logger.debug("removed %s (an earlier attempt of this job)", old)

    def _drop_lost(self, job_id: int, key: str, out_dir: Path, stage: str) -> None:
        """Another worker took the job over: remove this attempt's folder, record nothing."""
        self.spool.remove_tree(out_dir)
        logger.warning(
            "job %d: lease lost to another worker, stopping after stage %s; %s: "
            "removed %s, nothing recorded or sent",
            job_id,
            stage,
            key,
            out_dir,
        )

    def _hand_back_disk_full(
        self, job_id: int, key: str, out_dir: Path, exc: BaseException
    ) -> None:
        """Results cannot be written for lack of space: queue the job again, attempt uncounted.

        The partial output is removed; the caller re-raises so the loop latches "disk full"
        (logged once) and backs off until a probe write works again.
        """
        shutil.rmtree(out_dir, ignore_errors=True)
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if not self._own(job):
                return
            assert job is not None
            job.state = JobState.QUEUED
            job.attempts = max(0, job.attempts - 1)
            job.error = f"waiting for disk space: {describe(exc)}"
            job.not_before = None
            job.lease_owner = None
            job.lease_expires_at = None
            series = s.get(Series, job.series_id)
            assert series is not None
            if series.state == SeriesState.PROCESSING:
                series.state = SeriesState.QUEUED
                series.reason = "results cannot be written: disk full; waiting for space"
        logger.debug("job %d: %s: queued again, disk full", job_id, key)

    def _own(self, job: Job | None) -> bool:
        return job is not None and job.state == JobState.RUNNING and job.lease_owner == self.owner

    def _finish_done(
        self, job_id: int, key: str, result: Any, uids: ResultUIDs, timings: dict[str, float]
    ) -> bool:
        """Record the result and queue its deliveries; False (nothing done) if not ours.

        The job row is locked first (PostgreSQL; SQLite serialises writers), so a worker
        taking the job over after this check waits and then finds it done.
        """
        with self.db.session() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if not self._own(job):
                return False
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
        return True

    def _finish_rejected(self, job_id: int, key: str, reason: str) -> bool:
        """Store the rejection; False (nothing stored) if the job is not ours any more."""
        with self.db.session() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if not self._own(job):
                return False
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
        return True

    def _finish_error(self, job_id: int, key: str, error: str, trace: str) -> bool:
        """Retry later or fail for good; False (nothing stored) if the job is not ours."""
        import datetime as dt

        wcfg = self.config.worker
        with self.db.session() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if not self._own(job):
                return False
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
        return True


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _fmt(value: Any) -> str:
    return "none" if value is None else f"{float(value):.2f}"
