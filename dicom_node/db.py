"""The node's database: studies, series, instances, jobs, results and deliveries.

SQLAlchemy 2 ORM, SQLite by default and any SQLAlchemy URL otherwise (PostgreSQL for
several workers). Tables are created by the alembic migrations in `dicom_node/migrations`
(`Database.upgrade`), never by `create_all`, so a site's database can be moved forward.

Work is handed out by *claiming* rows: a job (or delivery) is taken by setting its state,
owner and lease expiry in one statement that only matches while the row is still free or
its lease has expired. On PostgreSQL the candidate row is first locked with
`FOR UPDATE SKIP LOCKED`, so concurrent workers never wait on each other; on SQLite every
transaction starts with `BEGIN IMMEDIATE`, which serialises writers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: PostgreSQL advisory lock key that serialises schema upgrades (`Database.upgrade`).
UPGRADE_LOCK_KEY = 7425311


def utcnow() -> dt.datetime:
    """Naive UTC (why: SQLite drops time zones, so every timestamp is stored naive UTC)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def series_label(series_uid: str, study_uid: str | None) -> str:
    """How every series lifecycle log line names its series: both UIDs, never patient data."""
    return f"series {series_uid} study {study_uid or '?'}"


class SeriesState:
    RECEIVING = "receiving"  # instances arriving; completion waits for it to go idle
    QUEUED = "queued"  # passed the rules, a job waits
    PROCESSING = "processing"
    DONE = "done"
    REJECTED = "rejected"  # failed the selection rules or the geometry checks
    FAILED = "failed"  # processing error after the last attempt


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a newer job for the same series replaced it before it ran

    FINAL = (DONE, REJECTED, FAILED, SUPERSEDED)


class DeliveryState:
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its result was superseded by a newer one before it went out


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    calling_host: Mapped[str | None] = mapped_column(String(255))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True, default=SeriesState.RECEIVING)
    reason: Mapped[str | None] = mapped_column(Text)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    received_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: instances refused at C-STORE, {reason: count} (they never became rows)
    refusals: Mapped[dict[str, int] | None] = mapped_column(JSON)
    #: how the last association that brought instances ended, when not by a release
    receive_interrupted: Mapped[str | None] = mapped_column(String(64))
    #: an association that delivered instances of the series is open until at most this
    #: (refreshed per instance, cleared when it ends): the series is not complete before
    association_open_until: Mapped[dt.datetime | None] = mapped_column(DateTime)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series", order_by="Job.id")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    times_received: Mapped[int] = mapped_column(Integer, default=1)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    not_before: Mapped[dt.datetime | None] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, index=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    series: Mapped[Series] = relationship(back_populates="jobs")
    result: Mapped[Result | None] = relationship(back_populates="job")


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    covid_probability: Mapped[float] = mapped_column(Float)
    lesion_volume_ml: Mapped[float] = mapped_column(Float)
    lung_volume_ml: Mapped[float | None] = mapped_column(Float)
    lung_involvement_percent: Mapped[float | None] = mapped_column(Float)
    seg_path: Mapped[str] = mapped_column(Text)
    sr_path: Mapped[str] = mapped_column(Text)
    extra_paths: Mapped[list[str] | None] = mapped_column(JSON)
    seg_series_uid: Mapped[str | None] = mapped_column(String(64))
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_series_uid: Mapped[str | None] = mapped_column(String(64))
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="result")
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="result", order_by="Delivery.id"
    )


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination", name="uq_delivery_dest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True, default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    result: Mapped[Result] = relationship(back_populates="deliveries")


# --------------------------------------------------------------------------- engine


def _sqlite_setup(engine: Engine) -> None:
    """WAL + busy timeout, and BEGIN IMMEDIATE so concurrent writers queue, not fail."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA foreign_keys = ON")
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
        except Exception:  # in-memory databases cannot use WAL
            logger.debug("WAL journal mode not available", exc_info=True)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


#: Seconds a new server connection may take (libpq drivers), so that start-up checks and
#: `/readyz` answer "unavailable" instead of hanging on an unreachable database host.
CONNECT_TIMEOUT_S = 10


def connect_timeout_args(url: str) -> dict[str, Any]:
    """`connect_args` with a connect timeout for libpq drivers, unless the URL sets one."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or "connect_timeout" in parsed.query:
        return {}
    if parsed.get_driver_name() not in ("psycopg2", "psycopg"):
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT_S}


class Database:
    """Engine + session factory for one URL; `upgrade()` brings the schema to head."""

    def __init__(self, url: str, echo: bool = False) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url.startswith("sqlite:///") and url not in ("sqlite://", "sqlite:///:memory:"):
                Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = connect_timeout_args(url)
        self.engine = create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            _sqlite_setup(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        session = self._sessions()
        try:
            with session.begin():
                yield session
        finally:
            session.close()

    def upgrade(self, revision: str = "head") -> tuple[str | None, str | None]:
        """Run the alembic migrations (start-up and `db upgrade`); (revision before, after).

        Processes that start together (SCP nodes and workers at boot, two `db upgrade`
        runs) are serialised, and the revision "before" is read under that lock, in the
        transaction that migrates: on PostgreSQL by a transaction-scoped advisory lock, on
        SQLite by the write lock of `BEGIN IMMEDIATE` (every transaction here starts so).
        The first migrates; the others wait, then find the schema at head and report
        before == after.
        """
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        with self.engine.begin() as connection:
            if self.dialect == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK_KEY})")
            before = MigrationContext.configure(connection).get_current_revision()
            cfg = alembic_config(self.url)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
            after = MigrationContext.configure(connection).get_current_revision()
        if before != after:
            logger.debug("database schema upgraded from %s to %s", before or "empty", after)
        return before, after

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Any:
    """An alembic Config pointing at the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# --------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP knows about one stored instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str | None
    path: str
    size: int
    sha256: str
    modality: str | None = None
    calling_ae: str | None = None
    calling_host: str | None = None
    called_ae: str | None = None
    #: how long the delivering association may stay open without another instance (its
    #: network timeout): completion does not judge the series before that
    open_for_s: float | None = None


@dataclass(frozen=True)
class IngestOutcome:
    series_id: int
    new_instance: bool
    content_changed: bool  # False for an identical re-send
    series_reopened: bool  # the series had left `receiving` and goes back to it
    new_series: bool = False  # the first instance of a series not seen before


class InstanceConflict(Exception):
    """A SOP Instance UID that already names an instance of another series.

    Why refuse: accepting it would either drop it from its new series or repoint the earlier
    series' row at a file of another series (issue 13).
    """


@dataclass(frozen=True)
class KnownInstance:
    """The row an earlier C-STORE left for a SOP Instance UID."""

    series_uid: str
    path: str
    sha256: str


def find_instance(db: Database, sop_uid: str) -> KnownInstance | None:
    with db.session() as s:
        row = s.execute(
            select(Series.series_instance_uid, Instance.path, Instance.sha256)
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.sop_instance_uid == sop_uid)
        ).first()
    return None if row is None else KnownInstance(row[0], row[1], row[2])


def _study_and_series(
    s: Session, study_uid: str, series_uid: str, modality: str | None, now: dt.datetime
) -> tuple[Series, bool]:
    """The series row (and its study's), created in `receiving` when first seen."""
    study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        study = Study(study_instance_uid=study_uid, created_at=now)
        s.add(study)
        s.flush()
    series = s.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()
    if series is not None:
        return series, False
    series = Series(
        study_id=study.id,
        series_instance_uid=series_uid,
        modality=modality,
        state=SeriesState.RECEIVING,
        n_instances=0,
        received_bytes=0,
        first_received_at=now,
        last_received_at=now,
    )
    s.add(series)
    s.flush()
    return series, True


def record_refusal(
    db: Database,
    study_uid: str,
    series_uid: str,
    modality: str | None,
    reason: str,
    now: dt.datetime | None = None,
) -> bool:
    """Count an instance refused at C-STORE against its series; True for a new series.

    A series whose every instance was refused is still created, so that completion rejects
    it with the stored reason instead of it vanishing without a trace.
    """
    now = now or utcnow()
    for attempt in range(3):
        try:
            with db.session() as s:
                series, new = _study_and_series(s, study_uid, series_uid, modality, now)
                refusals = dict(series.refusals or {})
                refusals[reason] = refusals.get(reason, 0) + 1
                series.refusals = refusals
                if series.state == SeriesState.RECEIVING:
                    series.last_received_at = now
                return new
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def refusal_summary(refusals: dict[str, int] | None) -> str | None:
    """One line for logs and reasons: 'N instance(s) refused at C-STORE: reason (n); ...'."""
    if not refusals:
        return None
    total = sum(refusals.values())
    parts = "; ".join(f"{why} ({n})" for why, n in sorted(refusals.items(), key=lambda kv: -kv[1]))
    return f"{total} instance(s) refused at C-STORE: {parts}"


def mark_association_end(db: Database, series_ids: list[int], interrupted: str | None) -> None:
    """Remember per series whether the last association that brought instances ended well;
    the series no longer waits for that association."""
    if not series_ids:
        return
    with db.session() as s:
        s.execute(
            update(Series)
            .where(Series.id.in_(series_ids))
            .values(receive_interrupted=interrupted, association_open_until=None)
        )


def record_instance(
    db: Database, rec: InstanceRecord, now: dt.datetime | None = None
) -> IngestOutcome:
    """Add or refresh the rows for one received instance (idempotent on SOP Instance UID).

    An identical re-send changes nothing but counters. A new or changed instance in a
    series that already left `receiving` (queued, processed, rejected) reopens it, so
    completion makes a new job once the series is idle again.
    """
    for attempt in range(3):
        try:
            with db.session() as s:
                return _record_instance(s, rec, now or utcnow())
        except IntegrityError:  # a concurrent association inserted the same study/series
            if attempt == 2:
                raise
            logger.debug("retrying instance row after a concurrent insert", exc_info=True)
    raise AssertionError("unreachable")


def _set_file(inst: Instance, rec: InstanceRecord, now: dt.datetime) -> None:
    """The columns that describe the stored file (new instance or changed re-send)."""
    inst.sop_class_uid = rec.sop_class_uid
    inst.transfer_syntax_uid = rec.transfer_syntax_uid
    inst.path = rec.path
    inst.size = rec.size
    inst.sha256 = rec.sha256
    inst.received_at = now


def _record_instance(s: Session, rec: InstanceRecord, now: dt.datetime) -> IngestOutcome:
    series, new_series = _study_and_series(s, rec.study_uid, rec.series_uid, rec.modality, now)
    inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == rec.sop_uid)).first()
    new_instance = inst is None
    changed = True
    if inst is None:
        inst = Instance(series_id=series.id, sop_instance_uid=rec.sop_uid, times_received=1)
        _set_file(inst, rec, now)
        s.add(inst)
        series.n_instances = (series.n_instances or 0) + 1
        series.received_bytes = (series.received_bytes or 0) + rec.size
    elif inst.series_id != series.id:
        other = s.get(Series, inst.series_id)
        raise InstanceConflict(
            "SOP Instance UID already belongs to series "
            + (other.series_instance_uid if other is not None else "?")
        )
    else:
        changed = inst.sha256 != rec.sha256
        inst.times_received += 1
        if changed:
            series.received_bytes = (series.received_bytes or 0) + rec.size - inst.size
            _set_file(inst, rec, now)
    if rec.open_for_s is not None:
        series.association_open_until = now + dt.timedelta(seconds=rec.open_for_s)
    series.calling_ae = rec.calling_ae
    series.calling_host = rec.calling_host
    series.called_ae = rec.called_ae
    if rec.modality and not series.modality:
        series.modality = rec.modality
    reopened = False
    if series.state == SeriesState.RECEIVING:
        series.last_received_at = now
    elif changed:
        reopened = True
        series.state = SeriesState.RECEIVING
        series.reason = None
        series.last_received_at = now
        series.purged_at = None
    return IngestOutcome(series.id, new_instance, changed, reopened, new_series)


# --------------------------------------------------------------------------- claiming


def _lock_candidates(db: Database, query: Select[Any]) -> Select[Any]:
    """Rows to try to claim; on PostgreSQL locked, skipping those another claimer holds."""
    if db.dialect == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def _take(
    s: Session,
    model: type[Job] | type[Delivery],
    row_id: int,
    claimable: ColumnElement[bool],
    state: str,
    owner: str,
    expires: dt.datetime,
    **values: Any,
) -> bool:
    """Claim one row for `owner`: a compare-and-set that only matches while it is claimable."""
    res = s.execute(
        update(model)
        .where(model.id == row_id, claimable)
        .values(
            state=state,
            lease_owner=owner,
            lease_expires_at=expires,
            attempts=model.attempts + 1,
            **values,
        )
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def _claimable_job(now: dt.datetime) -> ColumnElement[bool]:
    return or_(
        and_(
            Job.state == JobState.QUEUED,
            or_(Job.not_before.is_(None), Job.not_before <= now),
        ),
        and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
    )


def claim_job(
    db: Database,
    owner: str,
    lease_seconds: float,
    max_attempts: int,
    now: dt.datetime | None = None,
) -> int | None:
    """Take the oldest claimable job for `owner`; return its id or None.

    A `running` job whose lease expired (its worker died) is claimable again; one that
    already used `max_attempts` is failed instead of being retried forever.
    """
    now = now or utcnow()
    expires = now + dt.timedelta(seconds=lease_seconds)
    with db.session() as s:
        query = _lock_candidates(db, select(Job).where(_claimable_job(now)).order_by(Job.id))
        for job in s.scalars(query.limit(8)).all():
            if job.attempts >= max_attempts:
                lost = job.state == JobState.RUNNING
                job.state = JobState.FAILED
                job.finished_at = now
                job.error = (job.error or "") + (
                    f" worker lost the job {job.attempts} times" if lost else ""
                )
                job.lease_owner = None
                series = s.get(Series, job.series_id)
                assert series is not None
                if series.state == SeriesState.PROCESSING:
                    series.state = SeriesState.FAILED
                    series.reason = f"processing failed after {job.attempts} attempts"
                logger.error(
                    "job %s failed for good: %s: %s attempts%s",
                    job.id,
                    series_label(series.series_instance_uid, series.study.study_instance_uid),
                    job.attempts,
                    ", the worker was lost" if lost else "",
                )
                continue
            taken_over = job.state == JobState.RUNNING
            claimable = _claimable_job(now)
            if _take(s, Job, job.id, claimable, JobState.RUNNING, owner, expires, started_at=now):
                if taken_over:
                    logger.warning(
                        "job %s: lease of %s expired, taken over by %s",
                        job.id,
                        job.lease_owner,
                        owner,
                    )
                return job.id
    return None


def renew_job_lease(db: Database, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Push the lease forward while working; False means another worker owns the job now."""
    with db.session() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))
        )
        return res.rowcount == 1  # type: ignore[attr-defined]


def _claimable_delivery(now: dt.datetime) -> ColumnElement[bool]:
    return or_(
        and_(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now),
        and_(Delivery.state == DeliveryState.SENDING, Delivery.lease_expires_at < now),
    )


def claim_deliveries(
    db: Database,
    owner: str,
    lease_seconds: float,
    limit: int,
    exclude_destinations: set[str] | None = None,
    now: dt.datetime | None = None,
) -> list[int]:
    """Claim due deliveries, at most one per destination (one slow peer never blocks another)."""
    now = now or utcnow()
    expires = now + dt.timedelta(seconds=lease_seconds)
    taken: list[int] = []
    busy = set(exclude_destinations or ())
    with db.session() as s:
        query = _lock_candidates(
            db,
            select(Delivery)
            .where(_claimable_delivery(now))
            .order_by(Delivery.next_attempt_at, Delivery.id),
        )
        for d in s.scalars(query.limit(200)).all():
            if len(taken) >= limit:
                break
            if d.destination in busy:
                continue
            claimable = _claimable_delivery(now)
            if _take(s, Delivery, d.id, claimable, DeliveryState.SENDING, owner, expires):
                taken.append(d.id)
                busy.add(d.destination)
    return taken
