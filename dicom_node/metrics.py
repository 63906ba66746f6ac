"""Prometheus metrics and health endpoints of one node process.

Every node process (SCP node, embedded or stand-alone worker) owns one `NodeMetrics`
with its own `CollectorRegistry` (not prometheus-client's global one, so several nodes
in one process, as in the tests, never mix their counts). The node's parts call its
methods; `start_http_server()` serves, from a daemon thread of the standard library's
HTTP server:

- `/metrics`  Prometheus text format
- `/healthz`  liveness: 200 while the process serves HTTP at all
- `/readyz`   readiness: 200 when every registered check passes (database reachable,
  spool writable, model loaded, SCP listening, as the process has them, and no fault
  met by the loops: database outage, disk full), else 503; the body is JSON naming
  each check and why it failed.

Queue depth is read from the database at scrape time (`queue_depth_from_db`), so it is
right whichever process changed the queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

#: Pipeline stages timed by the worker (`SeriesResult.timings`) plus the exporter's send.
STAGES = ("load", "lung_mask", "inference", "seg", "sr", "send")

#: Seconds; covers a 64x64 test series on a CPU up to a 500-slice series on a slow CPU.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

CheckResult = tuple[bool, str]
Check = Callable[[], CheckResult]
DepthSource = Callable[[], Mapping[tuple[str, str], float]]
FailedSource = Callable[[], Mapping[str, float]]


class _QueueDepthCollector(Collector):
    """`ctmtl_queue_depth{queue, state}` from a callback, evaluated per scrape."""

    def __init__(self) -> None:
        self.source: DepthSource | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ctmtl_queue_depth",
            "Work waiting or in progress, from the shared database",
            labels=["queue", "state"],
        )
        if self.source is not None:
            try:
                for (queue, state), value in sorted(self.source().items()):
                    family.add_metric([queue, state], float(value))
            except Exception as exc:  # a scrape must not fail because the DB is down
                from dicom_node.backoff import describe, is_database_unavailable

                # an outage is logged once by the node's loops; other errors each scrape
                level = logging.DEBUG if is_database_unavailable(exc) else logging.WARNING
                logger.log(level, "queue depth unavailable: %s", describe(exc))
        yield family


class _FailedDeliveriesCollector(Collector):
    """`ctmtl_deliveries_failed{destination}` from a callback, evaluated per scrape."""

    def __init__(self) -> None:
        self.source: FailedSource | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ctmtl_deliveries_failed",
            "Deliveries of current results that failed for good, by destination (from the "
            "shared database; queued again by resend or when the destination answers again)",
            labels=["destination"],
        )
        if self.source is not None:
            try:
                for destination, value in sorted(self.source().items()):
                    family.add_metric([destination], float(value))
            except Exception as exc:  # a scrape must not fail because the DB is down
                logger.debug("failed deliveries unavailable: %s", exc)
        yield family


class NodeMetrics:
    """The metrics of one node process; thread-safe (prometheus-client counters are)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(name, documentation, labels, registry=r)

        self.associations = counter(
            "ctmtl_associations",
            "Associations requested by peers, by outcome (accepted, rejected)",
            "outcome",
        )
        self.associations_ended = counter(
            "ctmtl_associations_ended",
            "Accepted associations by how they ended (released, aborted, dropped)",
            "how",
        )
        self.instances = counter(
            "ctmtl_instances_received", "C-STORE requests stored (status 0x0000)"
        )
        self.instances_refused = counter(
            "ctmtl_instances_refused",
            "C-STORE requests answered with an error status, by status",
            "status",
        )
        self.bytes = counter("ctmtl_received_bytes", "Bytes of instances written to the spool")
        self.series_processed = counter("ctmtl_series_processed", "Series with results written")
        self.series_rejected = counter(
            "ctmtl_series_rejected",
            "Series refused by the selection rules, geometry checks or the pipeline",
        )
        self.series_failed = counter(
            "ctmtl_series_failed", "Series whose processing failed after the last attempt"
        )
        self.deliveries = counter(
            "ctmtl_deliveries",
            "Result deliveries (one C-STORE association per attempt), by destination and outcome",
            "destination",
            "outcome",
        )
        self.stage_seconds = Histogram(
            "ctmtl_stage_seconds",
            "Time per processing stage (load, lung_mask, inference, seg, sr, send)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_loaded = Gauge(
            "ctmtl_model_loaded", "1 when this process has its model loaded", registry=r
        )
        self.started = Gauge(
            "ctmtl_process_start_time_seconds", "Unix time this node process started", registry=r
        )
        self.started.set(time.time())
        for stage in STAGES:  # export every series, also before the first observation
            self.stage_seconds.labels(stage=stage)
        for outcome in ("accepted", "rejected"):
            self.associations.labels(outcome=outcome)
        for how in ("released", "aborted", "dropped"):
            self.associations_ended.labels(how=how)
        self.database_outages = counter(
            "ctmtl_database_outages",
            "Times this process found the database unavailable (one per outage)",
        )
        self.disk_full = counter(
            "ctmtl_disk_full",
            "Times this process could not write results for lack of disk space (one per episode)",
        )
        self.fault_active = Gauge(
            "ctmtl_fault_active",
            "1 while a fault lasts: database (unavailable), disk_full",
            ["fault"],
            registry=r,
        )
        for fault in ("database", "disk_full"):
            self.fault_active.labels(fault=fault).set(0)
        self._depth = _QueueDepthCollector()
        r.register(self._depth)
        self._failed = _FailedDeliveriesCollector()
        r.register(self._failed)
        self._checks: dict[str, Check] = {}
        self._model_loaded = False
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- recording

    def association_accepted(self) -> None:
        self.associations.labels(outcome="accepted").inc()

    def association_rejected(self) -> None:
        self.associations.labels(outcome="rejected").inc()

    def association_ended(self, how: str) -> None:
        """`how`: released, aborted (A-ABORT by either side) or dropped (no release)."""
        self.associations_ended.labels(how=how).inc()

    def instance_stored(self, nbytes: int) -> None:
        self.instances.inc()
        self.bytes.inc(max(0, int(nbytes)))

    def instance_refused(self, status: int) -> None:
        self.instances_refused.labels(status=f"0x{int(status):04X}").inc()

    def series_done(self, timings: Mapping[str, Any] | None = None) -> None:
        """One series processed; `timings` are its seconds per stage."""
        self.series_processed.inc()
        for stage, seconds in (timings or {}).items():
            if stage in STAGES and isinstance(seconds, (int, float)):
                self.stage_seconds.labels(stage=stage).observe(float(seconds))

    def series_refused(self) -> None:
        self.series_rejected.inc()

    def series_given_up(self) -> None:
        self.series_failed.inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(float(seconds))

    def delivery(self, destination: str, ok: bool) -> None:
        self.deliveries.labels(destination=destination, outcome="ok" if ok else "error").inc()

    def set_model_loaded(self, loaded: bool) -> None:
        self._model_loaded = bool(loaded)
        self.model_loaded.set(1 if loaded else 0)

    @property
    def is_model_loaded(self) -> bool:
        return self._model_loaded

    def set_queue_depth_source(self, source: DepthSource | None) -> None:
        self._depth.source = source

    def set_failed_deliveries_source(self, source: FailedSource | None) -> None:
        self._failed.source = source

    def watch_faults(self, faults: Any) -> None:
        """Count and show the latches of `faults` (`dicom_node.backoff.NodeFaults`)."""
        for latch in faults:
            latch.listen(self._fault_changed)

    def _fault_changed(self, latch: Any, active: bool) -> None:
        self.fault_active.labels(fault=latch.name).set(1 if active else 0)
        if active:
            (self.database_outages if latch.name == "database" else self.disk_full).inc()

    # ----------------------------------------------------------------- readiness

    def add_check(self, name: str, check: Check) -> None:
        """Register a readiness check: returns (ok, detail); an exception counts as failed."""
        with self._lock:
            self._checks[name] = check

    def readiness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        with self._lock:
            checks = dict(self._checks)
        out: dict[str, dict[str, Any]] = {}
        for name, check in checks.items():
            try:
                ok, detail = check()
            except Exception as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            out[name] = {"ok": bool(ok), "detail": detail}
        return all(v["ok"] for v in out.values()), out

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------------------- checks


def database_check(db: Any) -> Check:
    """The database answers a query on the node's schema (db: `dicom_node.db.Database`).

    Why not `SELECT 1` alone: SQLite answers that without reading its file, so a broken
    file would look ready. Reading `alembic_version` needs a working connection (server
    databases) and a readable schema (both). The detail is one line, password masked.
    """
    from sqlalchemy import text

    from dicom_node.redact import mask_secrets

    def check() -> CheckResult:
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except Exception as exc:
            orig = getattr(exc, "orig", None)
            detail = " ".join(str(orig if orig is not None else exc).split())
            return False, mask_secrets(f"{db.dialect}: {type(exc).__name__}: {detail}")
        if revision is None:
            return False, f"{db.dialect}: the schema has no revision (run ctmtl-node db upgrade)"
        return True, db.dialect

    return check


def spool_check(root: Path, min_free_mb: float = 0.0) -> Check:
    """A file can be created in the spool and the free space is above the minimum."""

    def check() -> CheckResult:
        root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".readyz.", dir=root)
        os.close(fd)
        os.unlink(name)
        free_mb = shutil.disk_usage(root).free / 2**20
        if free_mb < min_free_mb:
            return False, f"{free_mb:.0f} MiB free, minimum {min_free_mb:g} MiB"
        return True, f"{free_mb:.0f} MiB free"

    return check


def model_check(metrics: NodeMetrics) -> Check:
    def check() -> CheckResult:
        loaded = metrics.is_model_loaded
        return loaded, "loaded" if loaded else "model not loaded"

    return check


def failed_deliveries_from_db(
    db: Any, destinations: Callable[[], Iterable[str]] | None = None
) -> FailedSource:
    """Failed deliveries of results not superseded, per destination, in one query.

    `destinations` (the configured names) are reported with 0 when none failed.
    """
    from sqlalchemy import func, select

    from dicom_node.db import Delivery, DeliveryState, Result

    def source() -> dict[str, float]:
        out = {name: 0.0 for name in (destinations() if destinations else ())}
        with db.session() as s:
            rows = s.execute(
                select(Delivery.destination, func.count())
                .join(Result, Result.id == Delivery.result_id)
                .where(Delivery.state == DeliveryState.FAILED, Result.superseded.is_(False))
                .group_by(Delivery.destination)
            ).all()
        out.update({str(name): float(n) for name, n in rows})
        return out

    return source


def queue_depth_from_db(db: Any) -> DepthSource:
    """Counts of jobs, deliveries and receiving series by state, one query each."""
    from sqlalchemy import func, select

    from dicom_node.db import Delivery, DeliveryState, Job, JobState, Series, SeriesState

    queues = (
        ("jobs", Job.state, (JobState.QUEUED, JobState.RUNNING)),
        ("deliveries", Delivery.state, (DeliveryState.PENDING, DeliveryState.SENDING)),
        ("series", Series.state, (SeriesState.RECEIVING,)),
    )

    def source() -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {
            (queue, state): 0 for queue, _, states in queues for state in states
        }
        with db.session() as s:
            for queue, column, states in queues:
                for state, n in s.execute(
                    select(column, func.count()).where(column.in_(states)).group_by(column)
                ):
                    out[(queue, state)] = n
        return out

    return source


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        metrics = self.server.metrics
        if path == "/metrics":
            self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            ok, checks = metrics.readiness()
            body = json.dumps({"ready": ok, "checks": checks}, indent=1).encode() + b"\n"
            self._send(200 if ok else 503, body, "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics http %s: " + format, self.client_address[0], *args)


class _MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], metrics: NodeMetrics) -> None:
        self.metrics = metrics
        super().__init__(address, _Handler)


class _MetricsHTTPServer6(_MetricsHTTPServer):
    address_family = socket.AF_INET6


@dataclass
class MetricsServer:
    """A running endpoint; `stop()` closes it."""

    httpd: _MetricsHTTPServer
    thread: threading.Thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def start_http_server(
    metrics: NodeMetrics, bind: str = "127.0.0.1", port: int = 9150
) -> MetricsServer:
    """Serve /metrics, /healthz, /readyz on `bind:port` (port 0 = a free one)."""
    httpd = (_MetricsHTTPServer6 if ":" in bind else _MetricsHTTPServer)((bind, port), metrics)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http", daemon=True
    )
    thread.start()
    server = MetricsServer(httpd, thread)
    logger.info("metrics and health endpoints on %s (/metrics /healthz /readyz)", server.url)
    return server


@contextlib.contextmanager
def serving(
    metrics: NodeMetrics, bind: str = "127.0.0.1", port: int = 0
) -> Iterator[MetricsServer]:
    """`with serving(m) as srv:` for tests and short-lived tools."""
    server = start_http_server(metrics, bind, port)
    try:
        yield server
    finally:
        server.stop()
