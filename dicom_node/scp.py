"""Storage SCP: C-ECHO and C-STORE with thin handlers (spool + row + status).

The C-STORE handler never decodes pixel data and never runs the model: it checks the
identifying UIDs, writes the bytes exactly as received (file meta + data set in the
negotiated transfer syntax) to the spool and fsyncs them, hands the row to the index
writer (`dicom_node.index`: the rows of concurrent associations are committed together,
each file put in place with its row) and answers once its row is committed. Statuses:

- 0x0000 success (also for an identical re-send: idempotent on SOP Instance UID)
- 0xA700 out of resources: spool below its free-space minimum, disk or database failure
- 0xA900 data set does not match SOP class: UIDs missing/invalid or differing from the
  C-STORE request
- 0xC000 cannot understand: the data set cannot be parsed or its pixel data is truncated

Association policy: the called AE title must be the node's (configurable) and the calling
AE title (optionally with its host) must be in `allowed_callers` when that list is set;
anything else is rejected during association negotiation. With `[node.tls]` the node also
(or only) listens with DICOM TLS (`dicom_node.tls`); a caller marked `require_tls` is
refused on the plain port, and one whose entry names a certificate identity
(`tls_subject`, `tls_san`, `tls_fingerprint_sha256`) is refused with any other
certificate. A failed TLS handshake is one log line with the peer's address, counted as a
rejected association (`_AssociationServer`). `stop()` stops accepting and then waits for the running
associations to end (`node.stop_timeout_s`), so a SIGTERM never cuts a transfer short.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

import pydicom
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
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import tls as dicom_tls
from dicom_node.config import NodeConfig, StartupError
from dicom_node.db import (
    Database,
    IngestOutcome,
    InstanceConflict,
    InstanceRecord,
    mark_association_end,
    record_refusal,
    series_label,
)
from dicom_node.index import IndexWriter, image_identity
from dicom_node.metrics import NodeMetrics
from dicom_node.parts import NodePart
from dicom_node.selection import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
)
from dicom_node.spool import InvalidUID, Spool, SpoolFull, validate_uid
from dicom_node.uids import uid_problem
from dicom_node.volume import pixel_size_problem

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


@dataclass
class _AssociationTally:
    """What one accepted association did, for the line logged when it ends."""

    calling: str
    address: str
    series_ids: set[int] = field(default_factory=set)
    stored: int = 0
    refused: int = 0
    end: str | None = None  # set from the ACSE primitive that ended it


def _printable(text: object, limit: int = 160) -> str:
    """One log-safe line: garbage bytes from a peer are escaped and cut, never echoed."""
    out = "".join(c if c.isprintable() and ord(c) < 0x7F else "?" for c in str(text))
    return out if len(out) <= limit else out[: limit - 3] + "..."


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


def _element(number: int, vr: bytes, value: bytes) -> bytes:
    """One group-2 element in explicit VR little endian (OB takes the long form)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, number, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("latin-1", "replace")
    return raw + pad * (len(raw) % 2)


def file_meta_bytes(
    sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """The File Meta Information group of a received instance, byte for byte what pynetdicom's
    `encode_file_meta(event.file_meta)` gives with the Source AE title added.

    Why not that call: it builds and writes a pydicom data set, 0.5 ms of GIL time per
    instance, a tenth of what the SCP spent with ten associations (py-spy). The group is
    always explicit VR little endian with these seven elements; `tests/node/test_scp.py`
    compares the two encodings.
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _padded(sop_class, b"\x00")),
            _element(0x0003, b"UI", _padded(sop_instance, b"\x00")),
            _element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
            _element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
            _element(0x0016, b"AE", _padded(source_ae, b" ")),
        )
    )
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


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
        self.index = IndexWriter(db, spool)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self.tls_context: Any = None  # ssl.SSLContext of the TLS listener (SIGHUP reload)
        self._ae: AE | None = None
        self._tallies: dict[int, _AssociationTally] = {}
        self._tally_lock = threading.Lock()

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
        # The handler checks every UID itself and logs one line per problem (why: pydicom
        # and pynetdicom would add up to 8 identical warnings per instance with a bad UID).
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        logging.getLogger("pynetdicom.utils").setLevel(logging.ERROR)
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            # pynetdicom's own event handlers format a summary of every C-STORE for INFO and
            # DEBUG lines even when they are dropped: 7 % of the SCP's GIL time (py-spy)
            _config.LOG_HANDLER_LEVEL = "none"
        stale = self.spool.remove_stale_parts()
        if stale:
            logger.warning(
                "removed %d unfinished instance file(s) (.part) left by a stopped process: "
                "never acknowledged, so the sender still has them",
                stale,
            )
        ae = self.build_ae()
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store_counted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_limit_rejected),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self._ae = ae
        tls_cfg = node.tls
        if tls_cfg.enabled:
            self.tls_context = dicom_tls.server_context(tls_cfg)
        main_ctx = self.tls_context if tls_cfg.enabled and tls_cfg.port is None else None
        self._server = _listen(ae, handlers, "node.port", node.bind, node.port, main_ctx, self)
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
                    ae, handlers, "node.tls.port", node.bind, tls_cfg.port, self.tls_context, self
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
        elif (wrong_cert := self._certificate_refusal(assoc, calling, host)) is not None:
            diagnostic, why = 0x03, wrong_cert
        elif (limit := node.max_associations_per_caller) is not None and (
            held := self._held_by(calling, host, assoc)
        ) >= limit:
            why = (
                f"calling AE title {calling!r} from {host} already holds {held} association(s) "
                f"(node.max_associations_per_caller = {node.max_associations_per_caller})"
            )
            self._reject(assoc, why, (0x02, 0x03, 0x02))  # transient: local limit exceeded
            return
        if diagnostic is not None:
            self._reject(assoc, why, (0x01, 0x01, diagnostic))

    def _certificate_refusal(self, assoc: Any, calling: str, host: str) -> str | None:
        """Why the caller's TLS certificate is not the one `allowed_callers` ties to its AE
        title (`tls_subject`, `tls_san`, `tls_fingerprint_sha256`); None when it is.

        Callers without TLS never get here with an identity (it implies `require_tls`).
        """
        if not _over_tls(assoc):
            return None
        cert = dicom_tls.peer_certificate(_socket_of(assoc))
        problem = self.config.caller_identity_problem(calling, host, cert)
        if problem is None:
            return None
        presented = "no client certificate" if cert is None else f"certificate {cert.subject!r}"
        return (
            f"calling AE title {calling!r} from {host}:{assoc.requestor.port} presented "
            f"{presented}, not the one allowed_callers names for it: {problem}"
        )

    def _reject(self, assoc: Any, why: str, rsd: tuple[int, int, int]) -> None:
        self.stats.add(rejected_associations=1)
        self.metrics.association_rejected()
        logger.warning("association rejected: %s", why)
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def _on_tls_refused(self, peer: str, why: str) -> None:
        """A caller whose TLS handshake failed: no association, one line, counted."""
        logger.warning("TLS connection from %s refused: %s", peer, why)
        self.stats.add(rejected_associations=1)
        self.metrics.association_rejected()

    def _held_by(self, calling: str, host: str, this: Any) -> int:
        ae = self._ae
        if ae is None:
            return 0
        return sum(
            1
            for a in ae.active_associations
            if a is not this
            and a.is_acceptor
            and a.is_established
            and str(a.requestor.ae_title).strip() == calling
            and a.requestor.address == host
        )

    def _on_limit_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejection when `node.max_associations` are open (why: log it)."""
        rq = event.assoc.requestor
        self.stats.add(rejected_associations=1)
        self.metrics.association_rejected()
        logger.warning(
            "association rejected: calling AE title %r from %s: %d association(s) open "
            "(node.max_associations = %d)",
            str(rq.ae_title).strip(),
            rq.address,
            self.config.node.max_associations,
            self.config.node.max_associations,
        )

    def _on_accepted(self, event: evt.Event) -> None:
        self.stats.add(associations=1)
        self.metrics.association_accepted()
        rq = event.assoc.requestor
        with self._tally_lock:
            self._tallies[id(event.assoc)] = _AssociationTally(
                str(rq.ae_title).strip(), f"{rq.address}:{rq.port}"
            )
        logger.info(
            "association from %s (%s:%s) accepted, %s",
            rq.ae_title,
            rq.address,
            rq.port,
            dicom_tls.peer_description(_socket_of(event.assoc)),
        )

    def _tally(self, assoc: Any) -> _AssociationTally | None:
        with self._tally_lock:
            return self._tallies.get(id(assoc))

    def _on_acse_recv(self, event: evt.Event) -> None:
        tally = self._tally(event.assoc)
        primitive = getattr(event, "primitive", None)
        if tally is None or tally.end is not None:
            return
        if isinstance(primitive, A_ABORT):
            tally.end = "aborted by the peer (A-ABORT)"
        elif isinstance(primitive, A_P_ABORT):
            tally.end = "dropped (connection closed without release)"

    def _on_released(self, event: evt.Event) -> None:
        self._ended(event.assoc, "released", "released")

    def _on_aborted(self, event: evt.Event) -> None:
        tally = self._tally(event.assoc)
        how = tally.end if tally is not None else None
        if how is None:
            how = "aborted by the node (network timeout or shutdown)"
        self._ended(event.assoc, how, "dropped" if how.startswith("dropped") else "aborted")

    def _ended(self, assoc: Any, how: str, kind: str) -> None:
        """One line per association end with its counts; series fed by a broken association
        are marked so that completion waits longer for them (a cut-off transfer)."""
        with self._tally_lock:
            tally = self._tallies.pop(id(assoc), None)
        if tally is None:
            return
        self.metrics.association_ended(kind)
        log = logger.info if kind == "released" else logger.warning
        log(
            "association from %s (%s) %s: %d instance(s) stored, %d refused, %d series",
            tally.calling,
            tally.address,
            how,
            tally.stored,
            tally.refused,
            len(tally.series_ids),
        )
        try:
            mark_association_end(
                self.db, sorted(tally.series_ids), None if kind == "released" else how
            )
        except SQLAlchemyError as exc:
            logger.error("cannot record how the association ended: %s", _printable(exc))

    def _on_echo(self, event: evt.Event) -> int:
        logger.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    def _on_store_counted(self, event: evt.Event) -> Dataset | int:
        """`_on_store` plus the refused-instance metric by status and the association tally."""
        status = self._on_store(event)
        code = status if isinstance(status, int) else int(status.Status)
        tally = self._tally(event.assoc)
        if code != STATUS_SUCCESS:
            self.metrics.instance_refused(code)
            if tally is not None:
                tally.refused += 1
        elif tally is not None:
            tally.stored += 1
        return status

    def _refuse(
        self,
        code: int,
        calling: str,
        why: str,
        series: tuple[str, str, str | None] | None = None,
        detail: str = "",
    ) -> Dataset:
        """Answer `code`, log one line, and count the refusal against its series (when its
        Study and Series UIDs are usable) so that `status` and completion can say why."""
        self.stats.add(failures=1)
        level = logging.ERROR if code == STATUS_OUT_OF_RESOURCES else logging.WARNING
        logger.log(level, "C-STORE from %s refused (0x%04X): %s%s", calling, code, why, detail)
        if series is not None and code != STATUS_OUT_OF_RESOURCES:
            study_uid, series_uid, modality = series
            try:
                record_refusal(self.db, study_uid, series_uid, modality, why)
            except SQLAlchemyError as exc:
                logger.error("cannot record the refusal: %s", _printable(exc))
        return _status(code, why)

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
            why = f"cannot parse data set ({type(exc).__name__}: {_printable(exc, 120)})"
            return self._refuse(STATUS_CANNOT_UNDERSTAND, calling, why)
        try:
            study = validate_uid(study_uid, "Study Instance UID")
            series = validate_uid(series_uid, "Series Instance UID")
        except InvalidUID as exc:
            code = STATUS_CANNOT_UNDERSTAND if problem else STATUS_DATASET_MISMATCH
            return self._refuse(code, calling, problem or _printable(exc))
        where = (study, series, modality)
        label = f" ({series_label(series, study)})"
        if problem:
            return self._refuse(STATUS_CANNOT_UNDERSTAND, calling, problem, where, label)
        try:
            sop_instance = validate_uid(sop_instance, "SOP Instance UID")
            sop_class = validate_uid(sop_class, "SOP Class UID")
        except InvalidUID as exc:
            return self._refuse(STATUS_DATASET_MISMATCH, calling, exc.general, where, label)
        if sop_instance != str(request.AffectedSOPInstanceUID).strip():
            why = "SOP Instance UID differs from the C-STORE request"
            return self._refuse(STATUS_DATASET_MISMATCH, calling, why, where, label)
        if sop_class != str(request.AffectedSOPClassUID).strip():
            why = "SOP Class UID differs from the C-STORE request"
            return self._refuse(STATUS_DATASET_MISMATCH, calling, why, where, label)
        if sop_class in PRIMARY_SOP_CLASSES:
            for_problem = uid_problem(ds.get("FrameOfReferenceUID"))
            if for_problem is not None:
                why = (
                    f"Frame of Reference UID is {for_problem}: results could not be placed "
                    "on this image"
                )
                return self._refuse(STATUS_DATASET_MISMATCH, calling, why, where, label)
        size_problem = pixel_size_problem(ds, int(self.config.node.max_pixel_data_mb * 2**20))
        if size_problem is not None:
            return self._refuse(STATUS_CANNOT_UNDERSTAND, calling, size_problem, where, label)

        head = b"".join(
            (b"\x00" * 128, b"DICM", file_meta_bytes(sop_class, sop_instance, str(ts), calling))
        )
        try:
            with cast(BytesIO, request.DataSet).getbuffer() as received:  # as sent, no copy
                pending = self.spool.write_pending(study, series, sop_instance, (head, received))
        except SpoolFull as exc:
            return self._refuse(STATUS_OUT_OF_RESOURCES, calling, "spool full", detail=f": {exc}")
        except OSError as exc:
            why = f"cannot write: {exc.strerror or exc}"
            return self._refuse(STATUS_OUT_OF_RESOURCES, calling, why)

        record = InstanceRecord(
            study_uid=study,
            series_uid=series,
            sop_uid=sop_instance,
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(ts),
            path=str(pending.path),
            size=pending.size,
            sha256=pending.sha256,
            modality=modality,
            calling_ae=calling,
            calling_host=assoc.requestor.address,
            called_ae=str(assoc.acceptor.ae_title).strip(),
            open_for_s=self.config.node.network_timeout_s,
        )
        try:
            outcome, stored = self.index.submit(record, pending, lambda: image_identity(ds))
        except InstanceConflict as exc:
            detail = f" (SOP Instance UID {sop_instance}, {series_label(series, study)})"
            return self._refuse(STATUS_DATASET_MISMATCH, calling, str(exc), where, detail)
        except SQLAlchemyError as exc:
            logger.error("C-STORE from %s: database error: %s", calling, _printable(exc))
            return self._refuse(STATUS_OUT_OF_RESOURCES, calling, "database unavailable")
        except OSError as exc:
            why = f"cannot write: {exc.strerror or exc}"
            return self._refuse(STATUS_OUT_OF_RESOURCES, calling, why)

        tally = self._tally(assoc)
        if tally is not None:
            tally.series_ids.add(outcome.series_id)
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
        elif stored.replaced and outcome.content_changed:
            logger.info(
                "%s: instance %s replaced by a changed copy of the same image",
                series_label(series, study),
                sop_instance,
            )
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


class _BulkReadSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU with as few `recv` calls as the kernel allows.

    Why: pynetdicom reads every PDU 4 KiB per `recv` call into a growing bytearray, so a
    512 x 512 CT slice took about 130 calls, each of which gives up the GIL and has to win
    it back against nine other associations' threads. Here the PDU's bytes go straight
    into one buffer of its length (`recv_into`); the contract (the bytes read, fewer only
    when the peer closed the connection) is pynetdicom's.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        data = bytearray(nr_bytes)
        view = memoryview(data)
        read = 0
        try:
            while read < nr_bytes:
                got = sock.recv_into(view[read:], nr_bytes - read)
                if not got:  # connection closed: what was read so far, as pynetdicom
                    break
                read += got
        finally:
            view.release()
        if read < nr_bytes:
            del data[read:]
        return data


class _RequestHandler(RequestHandler):
    """pynetdicom's request handler, with the association's socket reading in bulk."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # the same object, its reads replaced: a second wrapper would queue a second
        # "transport connection open" event into the state machine
        assoc.dul.socket.__class__ = _BulkReadSocket
        return assoc


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake done and judged first.

    pynetdicom wraps the accepted socket and lets the handshake happen on the first read
    of the association, where a failure became a traceback without the peer's address
    and no rejection was counted. Here the connection's own thread (never the accept
    loop) checks that a TLS ClientHello comes, completes the handshake within
    `node.acse_timeout_s` and, when it fails, logs one line with the peer's address and
    the reason and counts it (`StorageSCP._on_tls_refused`); only then does pynetdicom
    see the connection. A connection closed before sending anything (a TCP probe) is
    not an association attempt: debug log only.
    """

    daemon_threads = True  # a stalled handshake never holds up the process's exit

    def __init__(self, *args: Any, scp: StorageSCP, **kwargs: Any) -> None:
        self._scp = scp
        kwargs.setdefault("request_handler", _RequestHandler)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        return self.socket.accept()  # wrapped in the connection's thread

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        if self.ssl_context is not None and isinstance(request, socket.socket):
            threading.current_thread().name = f"tls-handshake@{_peer_text(client_address)}"
            tls = self._handshake(request, client_address)
            if tls is None:
                return
            request = tls
        super().process_request_thread(request, client_address)

    def _handshake(self, raw: socket.socket, address: Any) -> ssl.SSLSocket | None:
        peer = _peer_text(address)
        timeout = self._scp.config.node.acse_timeout_s
        conn: socket.socket = raw
        try:
            raw.settimeout(timeout)
            first = raw.recv(1, socket.MSG_PEEK)
            if not first:
                logger.debug("connection from %s closed before any TLS handshake", peer)
                self.shutdown_request(raw)
                return None
            if first != b"\x16":  # TLS record type "handshake"
                what = ": a plain DICOM association?" if first == b"\x01" else ""
                self._refuse(raw, peer, f"not a TLS handshake (first byte 0x{first[0]:02X}{what})")
                return None
            assert self.ssl_context is not None
            conn = self.ssl_context.wrap_socket(raw, server_side=True)
            assert isinstance(conn, ssl.SSLSocket)
            conn.do_handshake()
            conn.settimeout(None)  # as pynetdicom's own accepted sockets: blocking
            return conn
        except OSError as exc:  # ssl.SSLError, TimeoutError, ConnectionResetError
            self._refuse(conn, peer, dicom_tls.inbound_failure(exc, timeout))
            return None

    def _refuse(self, conn: socket.socket, peer: str, why: str) -> None:
        try:
            self._scp._on_tls_refused(peer, why)
        finally:
            self.shutdown_request(conn)


def _peer_text(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


def _listen(
    ae: AE,
    handlers: list[Any],
    key: str,
    bind: str,
    port: int,
    ssl_context: Any,
    scp: StorageSCP,
) -> ThreadedAssociationServer:
    """Start one listener of the SCP; a port in use is a `StartupError` naming `key`.

    As `AE.start_server(block=False)`, with `_AssociationServer` (TLS handshakes judged
    before pynetdicom sees the connection).
    """
    try:
        server = ae.make_server(
            (bind, port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=_AssociationServer,
            scp=scp,
        )
    except OSError as exc:
        what = "the storage SCP" + (" with TLS" if ssl_context is not None else "")
        raise StartupError.port_in_use(key, bind, port, what, exc) from exc
    name = f"AcceptorServer@{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: AE.shutdown() and server.shutdown()
    return server


def _socket_of(assoc: Any) -> Any:
    """The transport socket of an association (an `ssl.SSLSocket` over TLS)."""
    return getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)


def _over_tls(assoc: Any) -> bool:
    return dicom_tls.is_tls(_socket_of(assoc))
