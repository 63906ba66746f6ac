"""Storage SCP: C-ECHO and C-STORE with thin handlers (spool + row + status).

The C-STORE handler never decodes pixel data and never runs the model: it checks the
identifying UIDs, writes the bytes exactly as received (file meta + data set in the
negotiated transfer syntax) to the spool, adds the database row and answers. Statuses:

- 0x0000 success (also for an identical re-send: idempotent on SOP Instance UID)
- 0xA700 out of resources: spool below its free-space minimum, disk or database failure
- 0xA900 data set does not match SOP class: UIDs missing/invalid or differing from the
  C-STORE request
- 0xC000 cannot understand: the data set cannot be parsed or its pixel data is truncated

Association policy: the called AE title must be the node's (configurable) and the calling
AE title (optionally with its host) must be in `allowed_callers` when that list is set;
anything else is rejected during association negotiation. With `[node.tls]` the node also
(or only) listens with DICOM TLS (`dicom_node.tls`); a caller marked `require_tls` is
refused on the plain port. `stop()` stops accepting and then waits for the running
associations to end (`node.stop_timeout_s`), so a SIGTERM never cuts a transfer short.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import tls as dicom_tls
from dicom_node.config import NodeConfig, StartupError
from dicom_node.db import (
    Database,
    IngestOutcome,
    InstanceRecord,
    record_instance,
    series_label,
)
from dicom_node.metrics import NodeMetrics
from dicom_node.parts import NodePart
from dicom_node.selection import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
)
from dicom_node.spool import InvalidUID, Spool, SpoolFull, validate_uid

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: Transfer syntaxes accepted for storage, in the node's order of preference.
STORAGE_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]

#: The SOP classes the node processes; every other storage SOP class is accepted too, so
#: that a routed non-CT series is received and then rejected with a stored reason.
PRIMARY_SOP_CLASSES = (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
)


@dataclass
class SCPStats:
    """Counters for logs, the benchmark and (later) metrics."""

    associations: int = 0
    rejected_associations: int = 0
    instances: int = 0
    duplicates: int = 0
    failures: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def _truncation_problem(ds: Dataset) -> str | None:
    """A top-level element whose value is shorter than its length field (a cut stream).

    pydicom reads such a stream without an error, keeping the short value.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if length is None or length == 0xFFFFFFFF or not isinstance(value, bytes):
            continue
        if len(value) < length:
            return f"data set truncated in element {tag} ({len(value)} of {length} bytes)"
    return None


def _pixel_data_problem(ds: Dataset, ts: UID) -> str | None:
    """Cheap check that native pixel data has the length its header promises."""
    if "PixelData" not in ds or ts.is_compressed:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"image pixel module incomplete: {exc}"
    expected = rows * cols * samples * frames * bits // 8
    actual = len(ds.PixelData)
    if actual < expected:
        return f"pixel data truncated ({actual} of {expected} bytes)"
    return None


class StorageSCP(NodePart):
    """The node's listening AE. `start()` returns at once; `stop()` closes the server."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        spool: Spool,
        on_stored: Callable[[IngestOutcome], None] | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        super().__init__(config, db, spool, metrics)
        self.spool: Spool = spool
        self.on_stored = on_stored
        self.stats = SCPStats()
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self.tls_context: Any = None  # ssl.SSLContext of the TLS listener (SIGHUP reload)
        self._ae: AE | None = None

    # ----------------------------------------------------------------- lifecycle

    def build_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        # Our own EVT_REQUESTED handler applies the AE title policy (it knows hosts too).
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.add_supported_context(VERIFICATION)
        seen: set[str] = set()
        for uid in PRIMARY_SOP_CLASSES:
            ae.add_supported_context(uid, STORAGE_TRANSFER_SYNTAXES)
            seen.add(uid)
        for cx in AllStoragePresentationContexts:
            uid = str(cx.abstract_syntax)
            if uid not in seen:
                ae.add_supported_context(uid, STORAGE_TRANSFER_SYNTAXES)
                seen.add(uid)
        return ae

    def start(self) -> None:
        node = self.config.node
        ae = self.build_ae()
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store_counted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        self._ae = ae
        tls_cfg = node.tls
        if tls_cfg.enabled:
            self.tls_context = dicom_tls.server_context(tls_cfg)
        main_ctx = self.tls_context if tls_cfg.enabled and tls_cfg.port is None else None
        self._server = _listen(ae, handlers, "node.port", node.bind, node.port, main_ctx)
        logger.info(
            "storage SCP %s listening on %s:%d%s",
            node.ae_title,
            node.bind,
            self.port,
            " (TLS)" if main_ctx is not None else "",
        )
        if tls_cfg.enabled and tls_cfg.port is not None:
            try:
                self._tls_server = _listen(
                    ae, handlers, "node.tls.port", node.bind, tls_cfg.port, self.tls_context
                )
            except StartupError:
                self.stop(wait_s=0)
                raise
            logger.info(
                "storage SCP %s listening with TLS on %s:%d",
                node.ae_title,
                node.bind,
                self.tls_port,
            )

    @property
    def tls_port(self) -> int | None:
        """Port of the TLS listener (the main port when it is TLS-only), else None."""
        if self._tls_server is not None:
            return int(self._tls_server.server_address[1])
        if self._server is not None and self._server.ssl_context is not None:
            return self.port
        return None

    @property
    def is_listening(self) -> bool:
        return self._server is not None and self._server.socket is not None

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.node.port
        return int(self._server.server_address[1])

    def stop(self, wait_s: float | None = None) -> None:
        """Stop accepting, then let running associations finish (at most `wait_s`)."""
        for server in (self._tls_server, self._server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
        ae, self._ae = self._ae, None
        if ae is not None:
            limit = self.config.node.stop_timeout_s if wait_s is None else wait_s
            deadline = time.monotonic() + limit
            running = []
            for assoc in ae.active_associations:
                if assoc.is_established:
                    running.append(assoc)
                else:  # still negotiating or a failed TLS handshake: nothing to finish
                    assoc.abort()
            if running:
                logger.info("waiting up to %.0f s for %d association(s)", limit, len(running))
            while running and time.monotonic() < deadline:
                time.sleep(0.1)
                running = [a for a in running if a.is_alive()]
            for assoc in running:
                logger.warning(
                    "association with %s still running: aborted", assoc.requestor.ae_title
                )
                assoc.abort()
            logger.info("storage SCP stopped")

    # ----------------------------------------------------------------- handlers

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        if rq is None:
            return
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        host = assoc.requestor.address
        node = self.config.node
        diagnostic = None
        if node.require_called_ae_title and called != node.ae_title:
            diagnostic, why = 0x07, f"called AE title {called!r} is not {node.ae_title!r}"
        elif not self.config.caller_allowed(calling, host):
            diagnostic, why = 0x03, f"calling AE title {calling!r} from {host} is not allowed"
        elif not _over_tls(assoc) and self.config.caller_requires_tls(calling, host):
            diagnostic, why = 0x03, f"calling AE title {calling!r} must use the TLS port"
        if diagnostic is not None:
            self.stats.add(rejected_associations=1)
            self.metrics.association_rejected()
            logger.warning("association rejected: %s", why)
            assoc.acse.send_reject(0x01, 0x01, diagnostic)
            assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        self.stats.add(associations=1)
        self.metrics.association_accepted()
        rq = event.assoc.requestor
        logger.info(
            "association from %s (%s:%s) accepted, %s",
            rq.ae_title,
            rq.address,
            rq.port,
            dicom_tls.peer_description(_socket_of(event.assoc)),
        )

    def _on_closed(self, event: evt.Event) -> None:
        logger.debug("association with %s closed", event.assoc.requestor.ae_title)

    def _on_echo(self, event: evt.Event) -> int:
        logger.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    def _on_store_counted(self, event: evt.Event) -> Dataset | int:
        """`_on_store` plus the refused-instance metric by status."""
        status = self._on_store(event)
        code = status if isinstance(status, int) else int(status.Status)
        if code != STATUS_SUCCESS:
            self.metrics.instance_refused(code)
        return status

    def _on_store(self, event: evt.Event) -> Dataset | int:
        t0 = time.perf_counter()
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        request = cast(C_STORE, event.request)
        ts = UID(str(event.context.transfer_syntax))
        try:
            ds = event.dataset
            problem = _truncation_problem(ds)
            sop_class = str(ds.get("SOPClassUID", "") or "")
            sop_instance = str(ds.get("SOPInstanceUID", "") or "")
            study_uid = ds.get("StudyInstanceUID")
            series_uid = ds.get("SeriesInstanceUID")
            modality = str(ds.get("Modality", "") or "") or None
            problem = problem or _pixel_data_problem(ds, ts)
        except Exception as exc:  # pydicom raises many kinds on corrupt input
            self.stats.add(failures=1)
            logger.warning(
                "C-STORE from %s: cannot parse data set (%s: %s)",
                calling,
                type(exc).__name__,
                exc,
            )
            return _status(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set: {exc}")
        if problem:
            self.stats.add(failures=1)
            logger.warning("C-STORE from %s: %s", calling, problem)
            return _status(STATUS_CANNOT_UNDERSTAND, problem)
        try:
            sop_instance = validate_uid(sop_instance, "SOP Instance UID")
            sop_class = validate_uid(sop_class, "SOP Class UID")
            study = validate_uid(study_uid, "Study Instance UID")
            series = validate_uid(series_uid, "Series Instance UID")
            if sop_instance != str(request.AffectedSOPInstanceUID).strip():
                raise InvalidUID("SOP Instance UID differs from the C-STORE request")
            if sop_class != str(request.AffectedSOPClassUID).strip():
                raise InvalidUID("SOP Class UID differs from the C-STORE request")
        except InvalidUID as exc:
            self.stats.add(failures=1)
            logger.warning("C-STORE from %s refused: %s", calling, exc)
            return _status(STATUS_DATASET_MISMATCH, str(exc))

        meta = event.file_meta
        meta.SourceApplicationEntityTitle = calling
        data = b"".join(
            (b"\x00" * 128, b"DICM", encode_file_meta(meta), event.encoded_dataset(False))
        )
        try:
            stored = self.spool.write_instance(study, series, sop_instance, data)
        except SpoolFull as exc:
            self.stats.add(failures=1)
            logger.error("C-STORE from %s: %s", calling, exc)
            return _status(STATUS_OUT_OF_RESOURCES, "spool full")
        except OSError as exc:
            self.stats.add(failures=1)
            logger.error("C-STORE from %s: cannot write to the spool: %s", calling, exc)
            return _status(STATUS_OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}")

        record = InstanceRecord(
            study_uid=study,
            series_uid=series,
            sop_uid=sop_instance,
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(ts),
            path=str(stored.path),
            size=stored.size,
            sha256=stored.sha256,
            modality=modality,
            calling_ae=calling,
            calling_host=assoc.requestor.address,
            called_ae=str(assoc.acceptor.ae_title).strip(),
        )
        try:
            outcome = record_instance(self.db, record)
        except SQLAlchemyError as exc:
            self.stats.add(failures=1)
            logger.error("C-STORE from %s: database error: %s", calling, exc)
            if not stored.replaced:
                self.spool.remove(stored.path)
            return _status(STATUS_OUT_OF_RESOURCES, "database unavailable")

        self.stats.add(instances=1, bytes=stored.size, duplicates=int(not outcome.content_changed))
        self.metrics.instance_stored(stored.size)
        if outcome.new_series:
            logger.info(
                "%s: first instance received from %s (%s), modality %s",
                series_label(series, study),
                calling,
                assoc.requestor.address,
                modality or "?",
            )
        elif outcome.series_reopened:
            logger.info("%s: new instance after completion, reopened", series_label(series, study))
        logger.debug(
            "stored %s (series %s, %d bytes, %s) in %.1f ms",
            sop_instance,
            series,
            stored.size,
            ts.name,
            1000 * (time.perf_counter() - t0),
        )
        if self.on_stored is not None:
            try:
                self.on_stored(outcome)
            except Exception:  # a listener must never fail the store
                logger.exception("on_stored listener failed")
        return STATUS_SUCCESS


def _listen(
    ae: AE, handlers: list[Any], key: str, bind: str, port: int, ssl_context: Any
) -> ThreadedAssociationServer:
    """Start one listener of the SCP; a port in use is a `StartupError` naming `key`."""
    try:
        server = ae.start_server(
            (bind, port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
    except OSError as exc:
        what = "the storage SCP" + (" with TLS" if ssl_context is not None else "")
        raise StartupError.port_in_use(key, bind, port, what, exc) from exc
    assert server is not None  # block=False returns the server
    return server


def _socket_of(assoc: Any) -> Any:
    """The transport socket of an association (an `ssl.SSLSocket` over TLS)."""
    return getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)


def _over_tls(assoc: Any) -> bool:
    return dicom_tls.is_tls(_socket_of(assoc))
