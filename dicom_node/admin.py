"""Operations: admin actions behind the CLI, deep config checks, service hooks.

The CLI (`ctmtl-node destinations | retry | resend | purge | db upgrade`) stays a thin
argument parser; the logic is here so that it can be tested against a real database
and reused (e.g. by a future web console). The service hooks attach the metrics /
health endpoint to a `NodeService` and apply a reloaded config on SIGHUP.

Every admin action is a short transaction on the shared database, so it is safe while
nodes and workers run: a retried job or a resent result is picked up by whichever
worker or exporter polls next.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from dicom_node.config import ConfigError, NodeConfig, StartupError, load_config
from dicom_node.db import (
    Database,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
    series_label,
    utcnow,
)
from dicom_node.tls import TLSConfigError

if TYPE_CHECKING:
    from dicom_node.metrics import MetricsServer
    from dicom_node.service import NodeService

logger = logging.getLogger(__name__)


class AdminError(Exception):
    """An admin action that cannot be done as asked; the message says why."""


# --------------------------------------------------------------------------- config


def deep_check(cfg: NodeConfig, connect: bool = False) -> list[tuple[str, str]]:
    """Checks beyond the schema that need the file system (and, with `connect`, the
    database server): TLS files load and keys are private, the checkpoint reads, the
    database URL is usable (`dicom_node.preflight.config_problems`).

    Returned as (key path, message) like schema errors, so `config check` prints both
    the same way; only errors (not "server unreachable right now" or warnings).
    """
    from dicom_node.preflight import config_problems

    return [(p.key, p.message) for p in config_problems(cfg, connect) if p.level == "error"]


# --------------------------------------------------------------------------- destinations


@dataclass(frozen=True)
class DestinationRow:
    name: str
    peer: str
    tls: bool
    routed_from: list[str]  # "default" and/or calling AE titles whose results go here


def destinations(cfg: NodeConfig) -> list[DestinationRow]:
    """Configured destinations and which routing rules send results to each."""
    from dicom_node.config import SENDER, DicomDestination

    rows = []
    for dest in cfg.destinations:
        sources: list[str] = []
        if dest.name in cfg.routing.default:
            sources.append("default")
        ae_title = dest.ae_title if isinstance(dest, DicomDestination) else None
        if SENDER in cfg.routing.default and ae_title:
            sources.append(f"sender={ae_title}")
        for ae, targets in cfg.routing.by_calling_ae.items():
            if dest.name in targets or (SENDER in targets and ae == ae_title):
                sources.append(ae)
        rows.append(DestinationRow(dest.name, dest.address, dest.secure, sources))
    return rows


# --------------------------------------------------------------------------- jobs


def failed_jobs(db: Database, error_contains: str | None = None) -> list[int]:
    """The last job of every series whose processing failed for good, oldest first.

    With `error_contains`, only jobs whose error holds that text (case-insensitive), e.g.
    `CheckpointError` for the jobs an older version failed while its model was missing.
    """
    with db.session() as s:
        rows = s.execute(
            select(Job.id, Job.series_id, Job.state, Job.error)
            .join(Series, Series.id == Job.series_id)
            .where(Series.state == SeriesState.FAILED)
            .order_by(Job.id)
        ).all()
    last: dict[int, tuple[int, str, str | None]] = {}
    for job_id, series_id, state, error in rows:
        last[series_id] = (job_id, state, error)
    needle = (error_contains or "").lower()
    return sorted(
        job_id
        for job_id, state, error in last.values()
        if state == JobState.FAILED and needle in (error or "").lower()
    )


def retry_job(db: Database, job_id: int) -> int:
    """Queue a new job for the series of a finished job (failed, rejected, done).

    A new row (not a reset) keeps the history of attempts; the series goes back to
    `queued`. Returns the new job id. Refused for a job still queued or running, or when
    the series' files were purged.
    """
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise AdminError(f"no job {job_id}")
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            raise AdminError(f"job {job_id} is {job.state}; nothing to retry")
        series = s.get(Series, job.series_id)
        assert series is not None
        if series.purged_at is not None:
            raise AdminError(
                f"series {series.series_instance_uid}: spooled files were purged "
                f"{series.purged_at:%Y-%m-%d}; send the series again"
            )
        active = s.scalars(
            select(Job.id).where(
                Job.series_id == series.id, Job.state.in_((JobState.QUEUED, JobState.RUNNING))
            )
        ).first()
        if active is not None:
            raise AdminError(f"series already has job {active} {JobState.QUEUED}/running")
        new = Job(
            series_id=series.id, state=JobState.QUEUED, attempts=0, n_instances=series.n_instances
        )
        s.add(new)
        series.state = SeriesState.QUEUED
        series.reason = f"retry of job {job_id} requested by an administrator"
        s.flush()
        new_id = new.id
        key = series_label(series.series_instance_uid, series.study.study_instance_uid)
    logger.info("%s: job %d queued as a retry of job %d", key, new_id, job_id)
    return new_id


def resend_series(
    db: Database, cfg: NodeConfig, series_uid: str, to: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """Queue the latest result of a series again for its destinations (or `to`).

    Returns (destination, what happened) per destination. A delivery being sent right
    now is left alone.
    """
    from dicom_node.export import set_pending

    with db.session() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()
        if series is None:
            raise AdminError(f"no series {series_uid}")
        result = s.scalars(
            select(Result)
            .where(Result.series_id == series.id, Result.superseded.is_(False))
            .order_by(Result.id.desc())
        ).first()
        if result is None:
            raise AdminError(f"series {series_uid} has no result to send (state {series.state})")
        for path in (result.seg_path, result.sr_path):
            if not Path(path).is_file():
                raise AdminError(f"result file {path} is gone (purged?); retry the job instead")
        if to:
            try:
                targets = [cfg.destination(name) for name in to]
            except KeyError as exc:
                raise AdminError(str(exc.args[0])) from None
        else:
            targets, problems = cfg.route(series.calling_ae)
            if not targets:
                raise AdminError("; ".join(problems) or "routing gives no destination")
        existing = {d.destination: d for d in result.deliveries}
        out = []
        now = utcnow()
        for dest in targets:
            row = existing.get(dest.name)
            if row is not None and row.state == DeliveryState.SENDING:
                out.append((dest.name, "being sent now; left alone"))
                continue
            if row is None:
                row = Delivery(result_id=result.id, destination=dest.name)
                s.add(row)
            set_pending(row, dest, now)
            out.append((dest.name, f"queued ({dest.address})"))
        result_id = result.id
        key = series_label(series_uid, series.study.study_instance_uid)
    logger.info("%s: result %d queued again: %s", key, result_id, out)
    return out


# --------------------------------------------------------------------------- purge


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}


def parse_duration(text: str) -> dt.timedelta:
    """`30d`, `12h`, `90m`, `2w`, `45s`; a bare number is days."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 7d, 12h, 30m)")
    return dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def purge(db: Database, spool_root: Path, older_than: dt.timedelta) -> int:
    """Delete spooled files of finished series idle for longer than `older_than`."""
    from dicom_node.completion import purge_finished
    from dicom_node.spool import Spool

    return purge_finished(db, Spool(spool_root), utcnow() - older_than)


# --------------------------------------------------------------------------- database


def db_upgrade(url: str) -> tuple[str | None, str | None]:
    """Run the migrations; (revision before, revision after).

    Both are read under the lock `Database.upgrade` takes, so of two runs at once exactly
    one reports the upgrade and the other finds the schema already at head.
    """
    db = Database(url)
    try:
        return db.upgrade()
    finally:
        db.dispose()


# --------------------------------------------------------------------------- service hooks


def attach_observability(service: NodeService) -> MetricsServer | None:
    """Readiness checks and queue depth for what this process runs; start the endpoint."""
    from dicom_node.backoff import faults_for
    from dicom_node.metrics import (
        database_check,
        failed_deliveries_from_db,
        model_check,
        queue_depth_from_db,
        spool_check,
        start_http_server,
    )

    m = service.metrics
    m.add_check("database", database_check(service.db))
    m.add_check("spool", spool_check(service.spool.root, service.config.spool.min_free_mb))
    if service.worker is not None:
        m.add_check("model", model_check(m))
    scp = service.scp
    if scp is not None:
        m.add_check("scp", lambda: (scp.is_listening, f"port {scp.port}"))
    m.set_queue_depth_source(queue_depth_from_db(service.db))
    faults = faults_for(service.db)  # what the loops met: database outage, disk full
    m.watch_faults(faults)
    m.add_check("faults", faults.readiness)
    m.set_failed_deliveries_source(
        failed_deliveries_from_db(service.db, lambda: [d.name for d in service.config.destinations])
    )
    mc = service.config.metrics
    if not mc.enabled:
        return None
    try:
        return start_http_server(m, mc.bind, mc.port)
    except OSError as exc:
        raise StartupError.port_in_use(
            "metrics.port", mc.bind, mc.port, "the metrics and health endpoint", exc
        ) from exc


#: Settings read only at start-up; a reload that changes them logs that a restart is due.
RESTART_KEYS = (
    "node.ae_title",
    "node.bind",
    "node.port",
    "node.max_associations",
    "node.tls.enabled",
    "node.tls.port",
    "database",
    "spool.path",
    "model",
    "worker.enabled",
    "export.enabled",
    "export.max_parallel",
    "metrics",
)


def _get(cfg: NodeConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump() if hasattr(value, "model_dump") else value


def reload_service(service: NodeService, path: str | Path | None) -> bool:
    """Re-read the config and apply it without stopping anything (SIGHUP).

    Allowed callers, destinations, routing, selection, completion, results, timeouts and
    retry settings apply to the next association / series / job; renewed TLS files apply
    to the next TLS association. Keys in `RESTART_KEYS` keep their old values until the
    process restarts. An invalid file changes nothing.
    """
    if path is None:
        logger.warning("reload requested but the node runs on embedded defaults; nothing to do")
        return False
    try:
        new = load_config(path)
    except ConfigError as exc:
        logger.error("reload refused, the running configuration stays: %s", exc)
        return False
    problems = deep_check(new)
    if problems:
        for key, msg in problems:
            logger.error("reload refused: %s: %s", key, msg)
        return False
    old = service.config
    pending = [k for k in RESTART_KEYS if _get(old, k) != _get(new, k)]
    for key in pending:
        logger.warning("reload: %s changed; takes effect after a restart", key)
    for key in RESTART_KEYS:  # keep start-up values so the running state stays consistent
        section, _, attr = key.rpartition(".")
        setattr(_resolve(new, section), attr, getattr(_resolve(old, section), attr))
    scp = service.scp
    if scp is not None:
        if scp.tls_context is not None and new.node.tls.enabled:
            try:
                from dicom_node.tls import reload_server_context

                reload_server_context(scp.tls_context, new.node.tls)
            except TLSConfigError as exc:
                logger.error("reload: TLS files not reloaded: %s", exc)
        ae = getattr(scp, "_ae", None)
        if ae is not None:
            ae.acse_timeout = new.node.acse_timeout_s
            ae.dimse_timeout = new.node.dimse_timeout_s
            ae.network_timeout = new.node.network_timeout_s
    service.config = new
    for part in (service.scp, service.completion, service.worker, service.exporter):
        if part is not None:
            part.config = new
    logger.info("configuration reloaded from %s", path)
    return True


def _resolve(cfg: NodeConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split(".") if dotted else ():
        value = getattr(value, part)
    return value
