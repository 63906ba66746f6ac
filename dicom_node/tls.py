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

import logging
import os
import socket
import ssl
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


def client_context(settings: TLSSettings) -> ssl.SSLContext:
    """Context for outbound associations (C-STORE of results, C-ECHO)."""
    _check_files(settings)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
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
