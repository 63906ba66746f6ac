"""DICOM TLS (PS3.15 B.1 / BCP 195): `ssl.SSLContext` builders for the SCP and the SCU.

The node listens with TLS when `[node.tls]` is enabled, either on its own port (`port`)
beside the plain one or instead of it, and sends with TLS to each destination whose
`tls` table is enabled. Contexts are built from a pydantic model so that a wrong path or
a half-configured peer is a config error with a key path, not a failure at the first
association. pynetdicom takes them as `AE.start_server(..., ssl_context=ctx)` and
`AE.associate(..., tls_args=(ctx, hostname))`.

The server context does the TLS handshake lazily, in the association's thread, instead
of in pynetdicom's accept loop: a peer that opens a connection and never completes the
handshake must not stop the node from accepting others.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(ValueError):
    """A TLS setting that cannot be turned into a context (missing file, bad key, ...)."""


class TLSSettings(BaseModel):
    """TLS towards one peer (a destination's `tls` table); also the base of `[node.tls]`.

    `cert_file`/`key_file` are this node's certificate chain and private key (PEM); they
    are needed when the peer asks for a client certificate. `ca_file` holds the CA(s)
    that sign the peer's certificate. `key_password_env` names an environment variable
    holding the key's password (e.g. set by systemd `LoadCredential`), never the password.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="env var with the key password"
    )
    ca_file: Path | None = Field(None, description="CA bundle (PEM) that signs the peer")
    verify_peer: bool = Field(True, description="check the peer's certificate against ca_file")
    check_hostname: bool = Field(
        True, description="outbound: the peer certificate must name the host (SAN)"
    )
    server_hostname: str | None = Field(
        None, description="outbound: name expected in the peer certificate (default: host)"
    )
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str | None = Field(
        None, description="OpenSSL cipher list for TLS 1.2 (default: OpenSSL's secure set)"
    )
    allow_readable_key: bool = Field(
        False,
        description="accept a key_file that other users may read or write (mode o+r/o+w), "
        "with a warning; by default such a key is refused",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TLSSettings:
        if not self.enabled:
            return self
        if self.verify_peer and self.ca_file is None:
            raise ValueError("tls.enabled with verify_peer needs ca_file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    def paths(self) -> list[Path]:
        return [p for p in (self.cert_file, self.key_file, self.ca_file) if p is not None]


class InboundTLSSettings(TLSSettings):
    """`[node.tls]`: TLS on the node's listening side.

    `port` set: a second, TLS-only listener on that port beside the plain `node.port`
    (callers with `require_tls = true` are refused on the plain one). `port` unset: the
    node's only port speaks TLS. With `require_client_cert` a caller must present a
    certificate signed by `ca_file` (mutual TLS, the usual DICOM setting).
    """

    port: int | None = Field(None, ge=0, le=65535, description="TLS port; none = node.port")
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _server_files(self) -> InboundTLSSettings:
        if not self.enabled:
            return self
        if self.cert_file is None or self.key_file is None:
            raise ValueError("node.tls.enabled needs cert_file and key_file")
        if self.require_client_cert and not self.verify_peer:
            raise ValueError("require_client_cert needs verify_peer = true")
        return self


def _check_files(settings: TLSSettings) -> None:
    for path in settings.paths():
        if not path.is_file():
            raise TLSConfigError(f"TLS file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise TLSConfigError(f"TLS file {path} is not readable by this user")
    if settings.key_file is not None:
        check_key_permissions(settings.key_file, settings.allow_readable_key)


_warned_keys: set[Path] = set()


def check_key_permissions(path: Path, allow_readable: bool = False) -> None:
    """Refuse a private key that every user of the host may read or write.

    Why: the key proves the node's identity to PACS and modalities; a copy made by any
    local user lets them impersonate it. Group access is fine (the install guide gives
    keys `root:ctmtl 0640`). With `allow_readable` it is a warning (logged once per file).
    """
    mode = path.stat().st_mode & 0o777
    if not mode & 0o006:
        return
    what = "readable" if mode & 0o004 else "writable"
    message = (
        f"TLS private key {path} is {what} by every user (mode {mode:04o}): "
        "give it mode 0600 (or 0640 for the node's group)"
    )
    if not allow_readable:
        raise TLSConfigError(f"{message}, or set allow_readable_key = true to accept it")
    if path not in _warned_keys:
        _warned_keys.add(path)
        logger.warning("%s; accepted because allow_readable_key = true", message)


def _key_password(settings: TLSSettings) -> str | None:
    if settings.key_password_env is None:
        return None
    value = os.environ.get(settings.key_password_env)
    if value is None:
        raise TLSConfigError(f"environment variable {settings.key_password_env} is not set")
    return value


def _common(ctx: ssl.SSLContext, settings: TLSSettings) -> ssl.SSLContext:
    ctx.minimum_version = _VERSIONS[settings.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION
    if settings.ciphers:
        try:
            ctx.set_ciphers(settings.ciphers)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"no usable cipher in {settings.ciphers!r}: {exc}") from exc
    if settings.cert_file is not None and settings.key_file is not None:
        try:
            ctx.load_cert_chain(settings.cert_file, settings.key_file, _key_password(settings))
        except ssl.SSLError as exc:
            raise TLSConfigError(
                f"cannot load certificate {settings.cert_file} with key {settings.key_file}: "
                f"{exc.reason or exc}"
            ) from exc
    if settings.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(settings.ca_file))
        except ssl.SSLError as exc:
            raise TLSConfigError(f"cannot load CA file {settings.ca_file}: {exc}") from exc
    return ctx


class _LazyHandshakeContext(ssl.SSLContext):
    """Server context whose sockets do the handshake on first read (association thread)."""

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


class _RecordingSocket(ssl.SSLSocket):
    """Client socket that leaves its first TLS error on its `ClientContext`.

    pynetdicom catches a failed handshake itself and reports only an aborted association;
    the error kept here tells the exporter and `echo` why (certificate, hostname, ...).
    In TLS 1.3 the peer's verdict on our client certificate arrives with the first read.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:  # ssl.SSLError, TimeoutError, ConnectionResetError
            _note_error(self.context, exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            _note_error(self.context, exc)
            raise


class ClientContext(ssl.SSLContext):
    """Outbound context; `handshake_error` is the first TLS error of its connection."""

    sslsocket_class = _RecordingSocket
    handshake_error: OSError | None = None


def _note_error(ctx: ssl.SSLContext, exc: OSError) -> None:
    if isinstance(ctx, ClientContext) and ctx.handshake_error is None:
        ctx.handshake_error = exc


def server_context(settings: InboundTLSSettings) -> ssl.SSLContext:
    """Context for `AE.start_server(ssl_context=...)`; raises `TLSConfigError`."""
    _check_files(settings)
    ctx = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, settings)
    if not settings.verify_peer:
        ctx.verify_mode = ssl.CERT_NONE
    elif settings.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(settings: TLSSettings) -> ClientContext:
    """Context for outbound associations (C-STORE of results, C-ECHO).

    Make one per association: it keeps that association's TLS error (`handshake_error`).
    """
    _check_files(settings)
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    _common(ctx, settings)
    if settings.verify_peer:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = settings.check_hostname
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        logger.warning("TLS peer verification is off: the peer's identity is not checked")
    return ctx


def tls_args(settings: TLSSettings | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    """`tls_args` for `AE.associate`, or None when TLS is off for this peer."""
    if settings is None or not settings.enabled:
        return None
    return client_context(settings), settings.server_hostname or host


def reload_server_context(ctx: ssl.SSLContext, settings: InboundTLSSettings) -> None:
    """Load renewed certificate/key/CA files into a running listener's context (SIGHUP).

    New associations use them; running ones keep their session. Raises `TLSConfigError`
    and leaves the context unchanged when the new files do not load.
    """
    server_context(settings)  # validate first: a half-loaded context must not serve
    _common(ctx, settings)


def peer_description(sock: Any) -> str:
    """`TLS <version>, peer <subject CN>` for logs, or `plain TCP` (the socket of an assoc)."""
    if not isinstance(sock, ssl.SSLSocket):
        return "plain TCP"
    try:
        cert: dict[str, Any] = dict(sock.getpeercert() or {})
    except (ValueError, OSError):
        cert = {}
    cn = None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
    return f"{sock.version() or 'TLS'}, peer {cn!r}" if cn else f"{sock.version() or 'TLS'}"


def is_tls(sock: Any) -> bool:
    return isinstance(sock, ssl.SSLSocket)


# --------------------------------------------------------------------------- failures

#: OpenSSL reasons: the peer does not speak TLS there (a plain port, another protocol)
_NOT_TLS = ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST")
#: the other side refused a certificate (or wants one)
_CERT_REFUSED = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_REQUIRED",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "ACCESS_DENIED",
)
#: no protocol version or cipher in common
_NO_COMMON = (
    "PROTOCOL_VERSION",
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "NO_SHARED_CIPHER",
    "NO_CIPHERS_AVAILABLE",
    "HANDSHAKE_FAILURE",
    "INSUFFICIENT_SECURITY",
)
_HOSTNAME_CODES = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_UNTRUSTED_CODES = {2, 18, 19, 20, 21}  # no issuer, self-signed, not signed by ca_file


@dataclass(frozen=True)
class TLSFailure:
    """A failed outbound TLS handshake in words. `permanent`: no retry can succeed until
    the configuration or a certificate changes (wrong CA, wrong name, not TLS there)."""

    message: str
    permanent: bool

    def __str__(self) -> str:
        return self.message


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or "").upper()


def _words(reason: str) -> str:
    return reason.lower().replace("_", " ")


def _verify_text(exc: ssl.SSLCertVerificationError) -> str:
    text = str(exc.verify_message or exc.reason or exc).strip().rstrip(".")
    return text[:1].lower() + text[1:]


def outbound_failure(exc: BaseException) -> TLSFailure:
    """What a TLS error of an outbound association means, and whether to retry it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"TLS: certificate verify failed: {_verify_text(exc)}"
        if exc.verify_code in _HOSTNAME_CODES:
            text += " (the destination's host or tls.server_hostname is not in its certificate)"
        elif exc.verify_code in _UNTRUSTED_CODES:
            text += " (the peer's certificate is not signed by a CA in tls.ca_file)"
        return TLSFailure(text, True)
    if isinstance(exc, ssl.SSLError):
        reason = _reason(exc)
        if any(r in reason for r in _NOT_TLS):
            text = f"TLS: the peer does not speak TLS on this port ({_words(reason)})"
            return TLSFailure(text, True)
        if any(r in reason for r in _CERT_REFUSED):
            return TLSFailure(
                f"TLS: the peer refused the node's client certificate, or wants one "
                f"({_words(reason)})",
                True,
            )
        if any(r in reason for r in _NO_COMMON):
            return TLSFailure(
                f"TLS: no protocol version or cipher in common with the peer ({_words(reason)})",
                True,
            )
        return TLSFailure(f"TLS: {_words(reason) or exc}", False)
    if isinstance(exc, TimeoutError):
        return TLSFailure("TLS: handshake timed out", False)
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return TLSFailure(f"TLS: connection lost during the handshake ({text})", False)


def handshake_failure(tls: tuple[ssl.SSLContext, str] | None) -> TLSFailure | None:
    """The TLS failure of the association made with these `tls_args`, if there was one."""
    if tls is None or not isinstance(tls[0], ClientContext):
        return None
    exc = tls[0].handshake_error
    return outbound_failure(exc) if exc is not None else None


def inbound_failure(exc: BaseException, timeout_s: float) -> str:
    """Why a caller's TLS handshake with the node failed, for the one log line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate verify failed: {_verify_text(exc)}"
    if isinstance(exc, ssl.SSLError):
        reason = _reason(exc)
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no client certificate (node.tls.require_client_cert = true)"
        if any(r in reason for r in _NOT_TLS):
            return f"not a TLS handshake ({_words(reason)})"
        if any(r in reason for r in _CERT_REFUSED):
            return f"the caller refused the node's certificate ({_words(reason)})"
        if any(r in reason for r in _NO_COMMON):
            return f"no protocol version or cipher in common ({_words(reason)})"
        if isinstance(exc, ssl.SSLEOFError) or "EOF" in reason:
            return "connection closed during the TLS handshake"
        return f"TLS handshake failed ({_words(reason) or exc})"
    if isinstance(exc, TimeoutError):
        return f"no complete TLS handshake within {timeout_s:g} s"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"connection lost during the TLS handshake ({text})"


class _NoSSLTraceback(logging.Filter):
    """pynetdicom logs a failed TLS connect or read with a traceback (`LOGGER.exception`)
    after a line that already names the error; the node says why in one line of its own.
    The traceback record is dropped; another one with an SSL error keeps its message only."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, ssl.SSLError):
            return True
        if record.msg is exc:  # LOGGER.exception(exc): the error again, as a traceback
            return False
        record.exc_info = None
        record.exc_text = None
        return True


for _name in ("pynetdicom.transport", "pynetdicom.dul"):
    logging.getLogger(_name).addFilter(_NoSSLTraceback())


# --------------------------------------------------------------------------- identity

#: OpenSSL's attribute names (as `getpeercert()` gives them) -> RFC 4514 short names
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "emailAddress",
    "serialNumber": "serialNumber",
    "surname": "SN",
    "givenName": "GN",
}
_TYPE_ALIASES = {
    **{long.upper(): short.upper() for long, short in _SHORT_NAMES.items()},
    "S": "ST",
    "E": "EMAILADDRESS",
    "EMAIL": "EMAILADDRESS",
}
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_DNS_NAME = re.compile(r"[a-z0-9*_-]+(\.[a-z0-9*_-]+)*")


def _attribute_type(name: str) -> str:
    key = name.strip().upper()
    return _TYPE_ALIASES.get(key, key)


def _attribute(name: str, value: str) -> tuple[str, str]:
    return _attribute_type(name), value.strip().casefold()


def parse_subject(text: str) -> tuple[tuple[str, str], ...]:
    """A distinguished name as sorted (TYPE, value) pairs, for comparing subjects.

    RFC 4514 (`CN=pacs1,O=Hospital,C=DE`, `+` for multi-valued RDNs, backslash escapes)
    or OpenSSL's `/C=DE/O=Hospital/CN=pacs1`. Order, spaces around separators and case
    do not matter. Raises ValueError for a part without `TYPE=`.
    """
    text = text.strip()
    separators = "/" if text.startswith("/") else ",+;"
    if separators == "/":
        text = text[1:]
    pairs: list[tuple[str, str]] = []
    key: str | None = None
    buf = bytearray()

    def close() -> None:
        nonlocal key, buf
        value = buf.decode("utf-8", "replace")
        if key is None or not key.strip():
            raise ValueError(f"{value.strip()!r} is not TYPE=value")
        pairs.append(_attribute(key, value))
        key, buf = None, bytearray()

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            pair = text[i + 1 : i + 3]
            if _HEX2.fullmatch(pair):
                buf += bytes.fromhex(pair)
                i += 3
            else:
                buf += text[i + 1].encode()
                i += 2
            continue
        if ch == "=" and key is None:
            key, buf = buf.decode("utf-8", "replace"), bytearray()
        elif ch in separators:
            close()
        else:
            buf += ch.encode()
        i += 1
    close()
    return tuple(sorted(pairs))


def _escape(value: str) -> str:
    out = []
    for n, ch in enumerate(value):
        if ch in '\\,+"<>;' or (n == 0 and ch in "# ") or (n == len(value) - 1 and ch == " "):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


def parse_san(entry: str) -> tuple[str, str]:
    """A subjectAltName to expect: ("IP", address) or ("DNS", lower-case name).

    `DNS:` / `IP:` prefixes are optional; without one an IP address is an IP entry.
    """
    text = entry.strip()
    kind: str | None = None
    prefix = re.match(r"(?i)(DNS|IP|IP Address):\s*", text)
    if prefix:
        kind = "DNS" if prefix.group(1).upper() == "DNS" else "IP"
        text = text[prefix.end() :]
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        ip = None
    if kind == "IP" and ip is None:
        raise ValueError(f"{entry!r} is not an IP address")
    if ip is not None and kind != "DNS":
        return "IP", ip.compressed
    name = text.rstrip(".").lower()
    if not _DNS_NAME.fullmatch(name):
        raise ValueError(f"{entry!r} is neither a DNS name nor an IP address")
    return "DNS", name


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons and spaces dropped)."""
    digits = re.sub(r"[\s:]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons optional)")
    return digits


@dataclass(frozen=True)
class PeerCertificate:
    """The certificate a caller presented (verified against `node.tls.ca_file`)."""

    subject: str  # RFC 4514, as logged: CN=pacs1,O=Hospital,C=DE
    attributes: tuple[tuple[str, str], ...]  # sorted (TYPE, casefolded value)
    common_name: str | None
    san: tuple[tuple[str, str], ...]  # ("DNS", name) / ("IP", address)
    sha256: str  # 64 lower-case hex digits of the DER certificate

    def san_text(self) -> str:
        return ", ".join(f"{kind}:{value}" for kind, value in self.san) or "none"


def peer_certificate(sock: Any) -> PeerCertificate | None:
    """The verified client certificate on an association's socket; None without one."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        der = sock.getpeercert(binary_form=True)
        info: dict[str, Any] = dict(sock.getpeercert() or {})
    except (ValueError, OSError):
        return None
    if not der:
        return None
    rdns = [[(str(k), str(v)) for k, v in rdn] for rdn in info.get("subject", ())]
    subject = ",".join(
        "+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn) for rdn in reversed(rdns)
    )
    cn = next((v for rdn in rdns for k, v in rdn if k == "commonName"), None)
    san: list[tuple[str, str]] = []
    for kind, value in info.get("subjectAltName", ()):
        try:
            san.append(parse_san(f"{'IP' if kind.startswith('IP') else kind}:{value}"))
        except ValueError:
            continue  # email, URI, ... entries: never matched
    return PeerCertificate(
        subject=subject,
        attributes=tuple(sorted(_attribute(k, v) for rdn in rdns for k, v in rdn)),
        common_name=cn,
        san=tuple(san),
        sha256=hashlib.sha256(der).hexdigest(),
    )


def identity_mismatch(
    cert: PeerCertificate | None,
    subject: str | None,
    san: list[str] | None,
    fingerprint_sha256: str | None,
) -> str | None:
    """Why `cert` is not the configured identity (every key given must match), or None.

    `subject` without `=` is compared with the certificate's CN, with `=` with the whole
    subject (`parse_subject`); `san`: any one of them must be in the subjectAltName.
    """
    if cert is None:
        return "no client certificate was presented"
    if subject is not None:
        if "=" in subject:
            if Counter(parse_subject(subject)) != Counter(cert.attributes):
                return f"its subject is not {subject!r}"
        elif (cert.common_name or "").strip().casefold() != subject.strip().casefold():
            return f"its subject CN is {cert.common_name!r}, not {subject!r}"
    if san:
        wanted = {parse_san(entry) for entry in san}
        if not wanted & set(cert.san):
            return f"its subjectAltName ({cert.san_text()}) has none of {list(san)}"
    if fingerprint_sha256 is not None:
        pinned = normalize_fingerprint(fingerprint_sha256)
        if cert.sha256 != pinned:
            return f"its SHA-256 fingerprint is {cert.sha256}, not the pinned {pinned[:16]}..."
    return None
