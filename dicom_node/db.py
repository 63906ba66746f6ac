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
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, CursorResult, Engine
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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in one transaction, without the ORM (the ingest path's statements)."""
        with self.engine.begin() as conn:
            yield conn

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


#: The tables under the ORM classes: the ingest path uses plain SQL statements (no ORM
#: compilation or session synchronisation per row).
_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
_STORED_INSTANCES = (
    select(
        _INSTANCES.c.id,
        _INSTANCES.c.sop_instance_uid,
        _INSTANCES.c.series_id,
        _SERIES.c.series_instance_uid.label("series_uid"),
        _INSTANCES.c.path,
        _INSTANCES.c.sha256,
        _INSTANCES.c.size,
        _INSTANCES.c.times_received,
    )
    .join(_SERIES, _SERIES.c.id == _INSTANCES.c.series_id)
    .where(_INSTANCES.c.sop_instance_uid.in_(bindparam("uids", expanding=True)))
)


def stored_instances(conn: Connection, sop_uids: Collection[str]) -> dict[str, dict[str, Any]]:
    """The rows earlier C-STOREs left for these SOP Instance UIDs, with their series' UID
    (one query for a batch): id, series_id, series_uid, path, sha256, size, times_received."""
    if not sop_uids:
        return {}
    rows = conn.execute(_STORED_INSTANCES, {"uids": sorted(set(sop_uids))})
    return {row.sop_instance_uid: dict(row._mapping) for row in rows}


def _study_and_series(
    conn: Connection, study_uid: str, series_uid: str, modality: str | None, now: dt.datetime
) -> tuple[int, str, bool]:
    """The series row's id and state (and its study's row), created in `receiving` when
    first seen; True when created here."""
    se, st = _SERIES.c, _STUDIES.c
    found = conn.execute(
        select(se.id, se.state).where(se.series_instance_uid == series_uid)
    ).first()
    if found is not None:
        return found[0], found[1], False
    study_id = conn.scalar(select(st.id).where(st.study_instance_uid == study_uid))
    if study_id is None:
        added = conn.execute(insert(_STUDIES).values(study_instance_uid=study_uid, created_at=now))
        study_id = _new_id(added)
    added = conn.execute(
        insert(_SERIES).values(
            study_id=study_id,
            series_instance_uid=series_uid,
            modality=modality,
            state=SeriesState.RECEIVING,
            n_instances=0,
            received_bytes=0,
            first_received_at=now,
            last_received_at=now,
        )
    )
    return _new_id(added), SeriesState.RECEIVING, True


def _new_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


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
                series_id, _, new = _study_and_series(
                    s.connection(), study_uid, series_uid, modality, now
                )
                series = s.get_one(Series, series_id)
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
            with db.transaction() as conn:
                return record_instances(conn, [rec], now or utcnow())[0]
        except IntegrityError:  # a concurrent association inserted the same study/series
            if attempt == 2:
                raise
            logger.debug("retrying instance row after a concurrent insert", exc_info=True)
    raise AssertionError("unreachable")


@dataclass
class _SeriesTally:
    """One series' row as read at the start of a batch, and what the batch adds to it."""

    id: int
    state: str
    new: bool
    instances: int = 0
    bytes: int = 0
    last_received_at: dt.datetime | None = None  # set unless only identical re-sends came
    reopen: bool = False
    open_until: dt.datetime | None = None
    rec: InstanceRecord | None = None  # the last one: caller and modality

    def params(self) -> dict[str, Any]:
        rec = self.rec
        assert rec is not None
        return {
            "b_id": self.id,
            "b_instances": self.instances,
            "b_bytes": self.bytes,
            "b_open_until": self.open_until,
            "b_calling_ae": rec.calling_ae,
            "b_calling_host": rec.calling_host,
            "b_called_ae": rec.called_ae,
            "b_modality": rec.modality or None,
            "b_last": self.last_received_at,
            "b_reopen": self.reopen,
        }


def _series_update() -> Any:
    """One statement for every series of a batch (executemany): counters added, the caller
    and the open association's deadline set, a finished series reopened where asked."""
    se = _SERIES.c
    reopen = bindparam("b_reopen", type_=Boolean)
    return (
        update(_SERIES)
        .where(se.id == bindparam("b_id"))
        .values(
            n_instances=se.n_instances + bindparam("b_instances", type_=Integer),
            received_bytes=se.received_bytes + bindparam("b_bytes", type_=BigInteger),
            association_open_until=func.coalesce(
                bindparam("b_open_until", type_=DateTime), se.association_open_until
            ),
            calling_ae=bindparam("b_calling_ae", type_=String),
            calling_host=bindparam("b_calling_host", type_=String),
            called_ae=bindparam("b_called_ae", type_=String),
            modality=func.coalesce(
                func.nullif(se.modality, ""), bindparam("b_modality", type_=String)
            ),
            last_received_at=func.coalesce(
                bindparam("b_last", type_=DateTime), se.last_received_at
            ),
            state=case((reopen, SeriesState.RECEIVING), else_=se.state),
            reason=case((reopen, None), else_=se.reason),
            purged_at=case((reopen, None), else_=se.purged_at),
        )
    )


#: The batch statements, built once (SQLAlchemy memoises a built statement's cache key).
_SERIES_UPDATE = _series_update()
_SERIES_STATES = select(_SERIES.c.series_instance_uid, _SERIES.c.id, _SERIES.c.state).where(
    _SERIES.c.series_instance_uid.in_(bindparam("uids", expanding=True))
)
_INSERT_INSTANCE = insert(_INSTANCES)


def record_instances(
    conn: Connection,
    recs: Sequence[InstanceRecord],
    now: dt.datetime,
    stored: dict[str, dict[str, Any]] | None = None,
) -> list[IngestOutcome]:
    """`record_instance` for a batch, in the caller's transaction, in plain SQL statements
    (a few per batch, not per row): the index writer commits the rows of many C-STOREs at
    once (`dicom_node.index`), where per-instance ORM sessions cost most of the SCP's time.

    `stored` is `stored_instances` for these UIDs when the caller has it already. A SOP
    Instance UID that names an instance of another series raises `InstanceConflict` (the
    caller checks that first; the batch is then retried one instance at a time).
    """
    if not recs:
        return []
    tallies: dict[str, _SeriesTally] = {}
    for uid, series_id, state in conn.execute(
        _SERIES_STATES, {"uids": sorted({r.series_uid for r in recs})}
    ):
        tallies[uid] = _SeriesTally(series_id, state, new=False)
    for rec in recs:
        if rec.series_uid not in tallies:
            made = _study_and_series(conn, rec.study_uid, rec.series_uid, rec.modality, now)
            tallies[rec.series_uid] = _SeriesTally(*made)
    if stored is None:
        stored = stored_instances(conn, {r.sop_uid for r in recs})
    known = dict(stored)  # rows added by this batch join it (a UID sent twice at once)
    inserts: list[dict[str, Any]] = []
    updates: dict[str, dict[str, Any]] = {}
    outcomes: list[IngestOutcome] = []
    for rec in recs:
        tally = tallies[rec.series_uid]
        files = {
            "sop_class_uid": rec.sop_class_uid,
            "transfer_syntax_uid": rec.transfer_syntax_uid,
            "path": rec.path,
            "size": rec.size,
            "sha256": rec.sha256,
            "received_at": now,
        }
        row = known.get(rec.sop_uid)
        new_instance = row is None
        changed = True
        if row is None:
            row = {"series_id": tally.id, "sop_instance_uid": rec.sop_uid, "times_received": 1}
            row.update(files)
            inserts.append(row)  # a second copy in this batch updates this dict in place
            known[rec.sop_uid] = row
            tally.instances += 1
            tally.bytes += rec.size
        elif row["series_id"] != tally.id:
            owner = row.get("series_uid") or "?"
            raise InstanceConflict(f"SOP Instance UID already belongs to series {owner}")
        else:
            if "id" in row:  # a stored row: changed in a copy, written by an UPDATE
                row = known[rec.sop_uid] = updates[rec.sop_uid] = dict(row)
            changed = row["sha256"] != rec.sha256
            row["times_received"] += 1
            if changed:
                tally.bytes += rec.size - row["size"]
                row.update(files)
        tally.rec = rec
        if rec.open_for_s is not None:
            tally.open_until = now + dt.timedelta(seconds=rec.open_for_s)
        reopened = False
        if tally.state == SeriesState.RECEIVING:
            tally.last_received_at = now
        elif changed:
            reopened = tally.reopen = True
            tally.state = SeriesState.RECEIVING
            tally.last_received_at = now
        new_series, tally.new = tally.new, False
        outcomes.append(IngestOutcome(tally.id, new_instance, changed, reopened, new_series))
    if inserts:
        conn.execute(_INSERT_INSTANCE, inserts)
    i = _INSTANCES.c
    for changes in updates.values():
        conn.execute(
            update(_INSTANCES)
            .where(i.id == changes["id"])
            .values({k: v for k, v in changes.items() if k in _INSTANCE_UPDATABLE})
        )
    conn.execute(_SERIES_UPDATE, [t.params() for t in tallies.values()])
    return outcomes


_INSTANCE_UPDATABLE = frozenset(
    (
        "sop_class_uid",
        "transfer_syntax_uid",
        "path",
        "size",
        "sha256",
        "received_at",
        "times_received",
    )
)


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
