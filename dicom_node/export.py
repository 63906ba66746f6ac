"""Export: results (SEG, SR, optional extras) to the configured destinations.

A destination is a DICOM peer (C-STORE, this module) or a DICOMweb archive (STOW-RS,
`dicom_node.dicomweb`); both are a `Target` here and share everything below.

Each (result, destination) pair is one `deliveries` row with its own state, attempt
count, next attempt time and last error. The exporter claims due rows, at most one per
destination at a time, and sends them on a small thread pool without waiting for the
others, so a destination that is down or slow (connect timeouts) never delays another.
A failed attempt is retried with exponential backoff
(`initial_backoff_s * 2**(attempt-1)`, capped at `max_backoff_s`) until `max_attempts`
(by default about 12 hours, longer than a PACS maintenance window). A delivery that failed
for good stays visible (`ctmtl-node status`, `ctmtl_deliveries_failed`); every
`export.recheck_failed_s` the exporter C-ECHOes each destination with failed deliveries and,
when it answers, queues them again with a fresh retry budget (except objects the peer
refused by status, which only `ctmtl-node resend` sends again).

A TLS failure says what failed ("TLS: certificate verify failed: hostname mismatch ...",
"... self-signed certificate", "the peer refused the node's client certificate"), not
"aborted or no answer". One that no retry can get past (the peer's certificate is not
trusted or does not name the host, the port does not speak TLS, a TLS file does not load)
fails the delivery at once; a config reload (SIGHUP) echoes the failed destinations
again at once with the new settings, and `ctmtl-node resend` queues it by hand.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.backoff import describe, is_database_unavailable
from dicom_node.config import DicomDestination, DicomWebDestination, NodeConfig
from dicom_node.db import (
    Database,
    Delivery,
    DeliveryState,
    Result,
    Series,
    claim_deliveries,
    series_label,
    utcnow,
)
from dicom_node.metrics import NodeMetrics
from dicom_node.parts import NodePart
from dicom_node.tls import TLSConfigError, TLSSettings, handshake_failure, tls_args

logger = logging.getLogger(__name__)

#: C-STORE warning statuses that still mean "stored" (coercion, elements discarded, ...)
_WARNINGS_OK = {0x0001, 0xB000, 0xB006, 0xB007}


#: How a DICOMweb refusal (400, 409, ...) begins: not queued again when the server answers
STOW_REFUSED = "STOW-RS refused"

Destination = DicomDestination | DicomWebDestination


class ExportError(RuntimeError):
    """A destination could not be reached or did not store every object.

    `permanent`: retrying cannot help until the configuration, a certificate or the
    objects change (a TLS verification failure, a TLS file that does not load, refused
    credentials, a DICOMweb refusal); not retried. `hint` says what to do, for the log.
    """

    def __init__(self, message: str, permanent: bool = False, hint: str = "") -> None:
        super().__init__(message)
        self.permanent = permanent
        self.hint = hint


class Target(Protocol):
    """One destination as the exporter sends to it: C-STORE `Peer` or `DicomWebPeer`."""

    def send(self, files: Sequence[Path]) -> list[str]:
        """Store `files`; raise `ExportError` unless all were stored."""
        ...

    def check(self) -> tuple[bool, str]:
        """(answers, what happened): C-ECHO or QIDO-RS."""
        ...

    def unreachable(self) -> str | None:
        """Why a TCP connection fails (refused, timed out), None when it works."""
        ...


@dataclass(frozen=True)
class Peer:
    """Where to send: the subset of a destination needed for one association."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    timeout_s: float = 30.0
    tls: TLSSettings | None = field(default=None, compare=False)

    def __str__(self) -> str:
        secure = " (TLS)" if self.tls is not None and self.tls.enabled else ""
        return f"{self.ae_title}@{self.host}:{self.port}{secure}"

    def tls_args(self) -> Any:
        """`tls_args` for `AE.associate` (None = plain TCP); raises `TLSConfigError`."""
        return tls_args(self.tls, self.host)

    def send(self, files: Sequence[Path]) -> list[str]:
        return send_files(self, files)

    def check(self) -> tuple[bool, str]:
        return echo(self)

    def unreachable(self) -> str | None:
        return tcp_problem(self.host, self.port, self.timeout_s)


def target_for(dest: Destination, node_ae: str) -> Target:
    """The `Target` for a configured destination of either kind."""
    if isinstance(dest, DicomWebDestination):
        from dicom_node.dicomweb import DicomWebPeer  # it imports this module

        return DicomWebPeer.of(dest)
    return peer_for(dest, node_ae)


def peer_for(dest: DicomDestination, node_ae: str) -> Peer:
    return Peer(
        dest.ae_title,
        dest.host,
        dest.port,
        dest.calling_ae_title or node_ae,
        dest.timeout_s,
        dest.tls if dest.tls.enabled else None,
    )


def _ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def echo(peer: Peer) -> tuple[bool, str]:
    """C-ECHO: (ok, what happened) for the CLI and health checks."""
    ae = _ae(peer.calling_ae_title, peer.timeout_s)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    t0 = time.perf_counter()
    try:
        tls = peer.tls_args()
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)
    except (OSError, ValueError) as exc:  # ValueError: TLSConfigError (files, key)
        return False, f"C-ECHO {peer}: {exc}"
    if not assoc.is_established:
        return False, _association_failure(assoc, peer, tls)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    ms = 1000 * (time.perf_counter() - t0)
    if status is not None and status.Status == 0x0000:
        return True, f"C-ECHO {peer}: success ({ms:.0f} ms)"
    code = f"0x{int(status.Status):04X}" if status is not None and "Status" in status else "none"
    return False, f"C-ECHO {peer}: status {code}"


def _association_failure(assoc: object, peer: Peer, tls: Any = None) -> str:
    if getattr(assoc, "is_rejected", False):
        return f"association with {peer} rejected (check AE titles / allowed callers)"
    tls_failure = handshake_failure(tls)  # the real cause, where pynetdicom says "aborted"
    if tls_failure is not None:
        return f"{tls_failure}; peer {peer}"
    if getattr(assoc, "is_aborted", False):
        unreachable = peer.unreachable()
        if unreachable is not None:
            return f"cannot connect to {peer}: {unreachable}"
        return f"association with {peer} aborted or no answer"
    return f"cannot associate with {peer}"


def tcp_problem(host: str, port: int, timeout_s: float) -> str | None:
    """Why a TCP connection to host:port fails (refused, timed out, ...), None when it works.

    pynetdicom reports a failed connect only as an aborted association; one plain connect
    tells "nothing listens there" from "a peer that accepted and then did not answer". The
    exporter's re-check uses it first, so a destination still down costs no log noise.
    """
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 5.0)):
            return None
    except ConnectionRefusedError:
        return f"connection refused ({where})"
    except TimeoutError:
        return f"connection timed out ({where})"
    except OSError as exc:
        return f"{exc.strerror or exc} ({where})"


def send_files(peer: Peer, files: Sequence[Path]) -> list[str]:
    """C-STORE `files` over one association; raise `ExportError` unless all were stored.

    Returns the SOP Instance UIDs stored. Each object is offered in its own transfer
    syntax plus explicit/implicit VR little endian.
    """
    datasets = [pydicom.dcmread(f) for f in files]
    ae = _ae(peer.calling_ae_title, peer.timeout_s)
    contexts: dict[str, list[str]] = {}
    for ds in datasets:
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), [])
        for ts in (
            str(ds.file_meta.TransferSyntaxUID),
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
        ):
            if ts not in syntaxes:
                syntaxes.append(ts)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    try:
        tls = peer.tls_args()
    except TLSConfigError as exc:  # a TLS file went missing or does not load any more
        raise ExportError(f"{peer}: {exc}", permanent=True) from exc
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)
    except OSError as exc:
        raise ExportError(f"cannot connect to {peer}: {exc}") from exc
    if not assoc.is_established:
        failure = handshake_failure(tls)
        raise ExportError(
            _association_failure(assoc, peer, tls), failure is not None and failure.permanent
        )
    stored: list[str] = []
    try:
        for ds, path in zip(datasets, files, strict=True):
            status = assoc.send_c_store(ds)
            if status is None or "Status" not in status:
                raise ExportError(f"{peer}: no C-STORE response for {path.name} (timeout or abort)")
            code = int(status.Status)
            if code != 0x0000 and code not in _WARNINGS_OK:
                comment = status.get("ErrorComment", "")
                raise ExportError(
                    f"{peer}: C-STORE of {path.name} failed, status 0x{code:04X} {comment}"
                )
            if code != 0x0000:
                logger.warning("%s stored %s with warning 0x%04X", peer, path.name, code)
            stored.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def backoff_seconds(attempt: int, initial: float, maximum: float) -> float:
    """Delay after the `attempt`-th failed attempt (1-based)."""
    return float(min(maximum, initial * 2 ** max(0, attempt - 1)))


#: "C-STORE of X failed, status 0xNNNN": the peer answered and refused the object
_REFUSED_STATUS = re.compile(r"C-STORE of .* failed, status 0x(?P<code>[0-9A-F]{4})")


def retry_when_answering(last_error: str | None) -> bool:
    """Whether a failed delivery is queued again once its destination answers C-ECHO.

    Not when the peer refused the object by status (other than out of resources, 0xA7xx),
    nor when a DICOMweb server refused the request (400, 409, a failure reason that no
    retry passes): sending it again would be refused again.
    """
    if STOW_REFUSED in (last_error or ""):
        return False
    m = _REFUSED_STATUS.search(last_error or "")
    return m is None or m.group("code").startswith("A7")


def requeue_failed(db: Database, dest: Destination) -> list[tuple[str, int]]:
    """Put the failed deliveries of current results to `dest` back to pending.

    Returns (series label, result id) of each; fresh attempts, due now.
    """
    now = utcnow()
    out: list[tuple[str, int]] = []
    with db.session() as s:
        rows = s.execute(
            select(Delivery, Series)
            .join(Result, Result.id == Delivery.result_id)
            .join(Series, Series.id == Result.series_id)
            .where(
                Delivery.destination == dest.name,
                Delivery.state == DeliveryState.FAILED,
                Result.superseded.is_(False),
            )
            .order_by(Delivery.id)
        ).all()
        for d, series in rows:
            if not retry_when_answering(d.last_error):
                continue
            set_pending(d, dest, now)
            out.append((series_label(series.series_instance_uid, series.study.study_instance_uid),
                        d.result_id))  # fmt: skip
    return out


def failed_destinations(db: Database) -> list[str]:
    """Destinations with failed deliveries of current (not superseded) results."""
    with db.session() as s:
        return sorted(
            s.scalars(
                select(Delivery.destination)
                .join(Result, Result.id == Delivery.result_id)
                .where(Delivery.state == DeliveryState.FAILED, Result.superseded.is_(False))
                .distinct()
            ).all()
        )


def queue_deliveries(
    session: object, result: Result, destinations: Sequence[Destination]
) -> list[Delivery]:
    """Add one pending delivery per destination for `result` (inside the caller's session)."""
    rows = []
    now = utcnow()
    for dest in destinations:
        row = Delivery(result_id=result.id, destination=dest.name)
        set_pending(row, dest, now)
        session.add(row)  # type: ignore[attr-defined]
        rows.append(row)
    return rows


def set_pending(row: Delivery, dest: Destination, now: dt.datetime) -> None:
    """(Re)queue `row` for `dest` as configured now: due at `now`, no attempts, no error."""
    row.ae_title, row.host, row.port = dest.endpoint
    row.state = DeliveryState.PENDING
    row.attempts = 0
    row.next_attempt_at = now
    row.last_error = None
    row.lease_owner = None
    row.lease_expires_at = None


class Exporter(NodePart):
    """Sends due deliveries; `run_once()` for tests, `run()` as the node's thread."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        owner: str | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        super().__init__(config, db, metrics=metrics)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:export"
        self._pool = ThreadPoolExecutor(
            max_workers=config.export.max_parallel, thread_name_prefix="export"
        )
        self._in_flight: dict[str, Future[None]] = {}
        self._lock = threading.Lock()
        self._next_recheck = 0.0  # time.monotonic() of the next echo of failed destinations
        self._rechecked_config = config  # a reloaded config is checked at once

    def _peer(self, d: Delivery) -> Target | None:
        """The destination as configured now; None when it was removed from the config.

        The row keeps only AE title, host and port, not the TLS or auth settings, so a
        removed destination is never sent to from the row alone (it may have needed them).
        """
        try:
            dest = self.config.destination(d.destination)
        except KeyError:
            return None
        return target_for(dest, self.config.node.ae_title)

    def dispatch(self) -> int:
        """Claim due deliveries for idle destinations and start sending them."""
        with self._lock:
            done = [n for n, f in self._in_flight.items() if f.done()]
            finished = [self._in_flight.pop(n) for n in done]
            busy = set(self._in_flight)
        for future in finished:
            self._reap(future)
        free = self.config.export.max_parallel - len(busy)
        if free <= 0:
            return 0
        ids = claim_deliveries(
            self.db, self.owner, self.config.export.lease_seconds, free, exclude_destinations=busy
        )
        for delivery_id in ids:
            with self.db.session() as s:
                name = s.get(Delivery, delivery_id).destination  # type: ignore[union-attr]
            future = self._pool.submit(self.deliver, delivery_id)
            with self._lock:
                self._in_flight[name] = future
        return len(ids)

    def _reap(self, future: Future[None]) -> None:
        """A send or echo that raised (the database went away mid-way): say so, once."""
        exc = future.exception()
        if exc is None:
            return
        if is_database_unavailable(exc):
            self.faults.database.trip("exporter", describe(exc), exc)
        else:
            logger.error("export task failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the deliveries in flight (tests, shutdown)."""
        with self._lock:
            futures = list(self._in_flight.values())
        for f in futures:
            f.result(timeout=timeout)

    def run_once(self) -> int:
        n = self.dispatch()
        self.wait()
        return n

    def deliver(self, delivery_id: int) -> None:
        """One attempt of one delivery; updates its row whatever happens."""
        with self.db.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                return
            result = s.get(Result, d.result_id)
            assert result is not None
            files = [Path(result.seg_path), Path(result.sr_path)]
            files += [Path(p) for p in (result.extra_paths or [])]
            series = s.get(Series, result.series_id)
            assert series is not None
            key = series_label(series.series_instance_uid, series.study.study_instance_uid)
            peer = self._peer(d)
            attempt = d.attempts
            name = d.destination
        t0 = time.perf_counter()
        error: str | None = None
        final = False  # no retry whatever the attempt count
        hint = ""  # why it is not retried, for the log
        if peer is None:
            error = (
                f"destination {name!r} is no longer in the configuration; not sent "
                "(add it again, then `ctmtl-node resend SERIES_UID`)"
            )
            final = True
        else:
            try:
                peer.send(files)
            except ExportError as exc:
                error = str(exc)
                if exc.permanent:
                    final = True
                    hint = exc.hint or (
                        "; not retried: fix the destination's tls settings (or the peer's "
                        "certificate), then reload the node (SIGHUP) or `ctmtl-node resend`"
                    )
            except Exception as exc:  # unreadable file, encoding error, ...
                error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        self.metrics.delivery(name, error is None)
        if error is None:
            self.metrics.observe_stage("send", seconds)
        cfg = self.config.export
        with self.db.session() as s:
            d = s.get(Delivery, delivery_id)
            assert d is not None
            if d.lease_owner != self.owner or d.state != DeliveryState.SENDING:
                logger.warning("delivery %s was taken over meanwhile; not updating", delivery_id)
                return
            d.lease_owner = None
            d.lease_expires_at = None
            if error is None:
                d.state = DeliveryState.DONE
                d.delivered_at = utcnow()
                d.last_error = None
                logger.info(
                    "%s: result %s delivered to %s (%s), %d objects in %.2f s",
                    key,
                    d.result_id,
                    name,
                    peer,
                    len(files),
                    seconds,
                )
            elif final or attempt >= cfg.max_attempts:
                d.state = DeliveryState.FAILED
                d.last_error = error
                logger.error(
                    "%s: delivery of result %s to %s failed for good after %d attempt(s): %s%s",
                    key,
                    d.result_id,
                    name,
                    attempt,
                    error,
                    hint,
                )
            else:
                delay = backoff_seconds(attempt, cfg.initial_backoff_s, cfg.max_backoff_s)
                d.state = DeliveryState.PENDING
                d.last_error = error
                d.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
                logger.warning(
                    "%s: delivery of result %s to %s failed (attempt %d/%d), retry in %.0f s: %s",
                    key,
                    d.result_id,
                    name,
                    attempt,
                    cfg.max_attempts,
                    delay,
                    error,
                )

    def pending(self) -> int:
        with self.db.session() as s:
            return len(
                s.scalars(
                    select(Delivery.id).where(
                        Delivery.state.in_((DeliveryState.PENDING, DeliveryState.SENDING))
                    )
                ).all()
            )

    def recheck_failed(self, force: bool = False) -> int:
        """C-ECHO (QIDO-RS) destinations with failed deliveries (`export.recheck_failed_s`).

        Each echo runs on the pool; when the destination answers, its failed deliveries
        are queued again (`requeue_failed`). After a config reload the echoes run at once
        (new TLS settings may fix a delivery that failed for a TLS reason). Returns the
        echoes started.
        """
        interval = self.config.export.recheck_failed_s
        now = time.monotonic()
        if self.config is not self._rechecked_config:  # reloaded (SIGHUP): TLS fixed?
            self._rechecked_config = self.config
            force = True
        if not force and (interval <= 0 or now < self._next_recheck):
            return 0
        self._next_recheck = now + interval
        started = 0
        for name in failed_destinations(self.db):
            try:
                dest = self.config.destination(name)
            except KeyError:  # removed from the config: `resend` once it is back
                continue
            key = f"echo:{name}"
            with self._lock:
                if key in self._in_flight and not self._in_flight[key].done():
                    continue
                self._in_flight[key] = self._pool.submit(self._recheck, dest)
            started += 1
        return started

    def _recheck(self, dest: Destination) -> None:
        peer = target_for(dest, self.config.node.ae_title)
        down = peer.unreachable()  # usually still down: no association or request, no noise
        if down is not None:
            logger.debug("%s has failed deliveries and is still unreachable: %s", dest.name, down)
            return
        ok, message = peer.check()
        if not ok:
            logger.debug("%s has failed deliveries and does not answer yet: %s", dest.name, message)
            return
        queued = requeue_failed(self.db, dest)
        if not queued:
            return
        for key, result_id in queued:
            logger.info(
                "%s: delivery of result %s to %s queued again (the destination answers again)",
                key,
                result_id,
                dest.name,
            )
        logger.info(
            "destination %s answers %s again (%s): %d failed deliveries queued again",
            dest.name,
            "C-ECHO" if isinstance(peer, Peer) else "QIDO-RS",
            message,
            len(queued),
        )

    def run(self, stop: threading.Event) -> None:
        logger.info("exporter started")
        guard = self.loop_guard("exporter")
        while not stop.is_set():
            guard.configure(self.config.backoff.initial_s, self.config.backoff.max_s)
            try:
                self.dispatch()
                self.recheck_failed()
                guard.succeeded()
            except Exception as exc:  # database unavailable, disk full, ...: back off
                stop.wait(guard.failed(exc, "export dispatch failed"))
                continue
            stop.wait(self.config.export.poll_interval_s)
        self.close()
        logger.info("exporter stopped")

    def close(self) -> None:
        """Let running sends finish (bounded by their timeouts), then stop the pool."""
        self._pool.shutdown(wait=True)
