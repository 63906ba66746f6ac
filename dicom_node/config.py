"""The node's configuration: one TOML file, validated with pydantic, env overrides.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is an error
with its key path rather than a silently ignored setting. Environment variables override
keys as `CTMTL_<SECTION>__<KEY>[__<SUBKEY>...]` (e.g. `CTMTL_NODE__PORT=11113`,
`CTMTL_DATABASE__URL=postgresql://...`); values are parsed as TOML scalars/arrays when
they parse, else taken as strings. Relative paths are resolved against the folder of the
config file, so the example works from any working directory.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.results import ResultOptions
from dicom_node.selection import SelectionRules
from dicom_node.tls import (
    InboundTLSSettings,
    PeerCertificate,
    TLSSettings,
    identity_mismatch,
    normalize_fingerprint,
    parse_san,
    parse_subject,
)

logger = logging.getLogger(__name__)

ENV_PREFIX = "CTMTL_"
SENDER = "sender"  # routing target: the destination configured for the calling AE

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_ae_title(value: str) -> str:
    """DICOM AE title rules: 1-16 characters, no backslash or control characters.

    Leading/trailing spaces are not significant in AE titles and are removed.
    """
    if not isinstance(value, str):
        raise ValueError("AE title must be a string")
    if _CONTROL.search(value):
        raise ValueError("AE title must not contain control characters")
    if "\\" in value:
        raise ValueError("AE title must not contain a backslash")
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title must not be empty or all spaces")
    if len(stripped) > 16:
        raise ValueError(f"AE title {stripped!r} is longer than 16 characters")
    return stripped


AETitle = Annotated[str, AfterValidator(validate_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSection(_Section):
    """`[node]`: the node's own application entity."""

    ae_title: AETitle = "CTMTL"
    bind: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 = all)")
    port: int = Field(11112, ge=0, le=65535, description="0 = any free port")
    max_associations: int = Field(16, ge=1)
    max_associations_per_caller: int | None = Field(
        None, ge=1, description="associations one caller (AE title and host) may hold at once"
    )
    max_pixel_data_mb: float = Field(
        1024.0, gt=0, description="refuse an instance whose decoded pixel data is larger"
    )
    max_pdu_size: int = Field(0, ge=0, description="0 = unlimited")
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    require_called_ae_title: bool = Field(
        True, description="refuse associations addressed to another AE title"
    )
    tls: InboundTLSSettings = Field(default_factory=InboundTLSSettings)
    stop_timeout_s: float = Field(
        120.0, ge=0, description="on SIGTERM, wait this long for running associations"
    )

    @model_validator(mode="after")
    def _tls_port(self) -> NodeSection:
        if self.tls.enabled and self.tls.port and self.tls.port == self.port:
            raise ValueError("node.tls.port must differ from node.port (or be left out)")
        return self


class AllowedCaller(_Section):
    """One peer allowed to send: its AE title, optionally pinned to a host address and to
    its TLS client certificate.

    `tls_subject`, `tls_san` and `tls_fingerprint_sha256` tie the AE title to a
    certificate (every key given must match): without them any certificate signed by
    `node.tls.ca_file` may call as this AE title. `tls_subject` without `=` is the
    subject's CN (`"pacs1.hospital.example"`); with `=` it is the whole subject in RFC 4514
    (`"CN=pacs1,O=Hospital,C=DE"`; order, spacing and case do not matter). `tls_san`: any
    one of these DNS names / IP addresses must be in the certificate's subjectAltName.
    An identity implies `require_tls`.
    """

    ae_title: AETitle
    host: str | None = Field(None, description="IP address the association must come from")
    require_tls: bool = Field(False, description="refuse this caller on the plain (non-TLS) port")
    tls_subject: str | None = Field(
        None, min_length=1, description="certificate subject CN, or the whole RFC 4514 subject"
    )
    tls_san: list[str] | None = Field(
        None, min_length=1, description="DNS names / IP addresses; one must be in the SAN"
    )
    tls_fingerprint_sha256: str | None = Field(
        None, description="SHA-256 of the certificate (hex, colons optional)"
    )

    @field_validator("tls_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None and "=" in value:
            parse_subject(value)  # ValueError: not TYPE=value
        return value

    @field_validator("tls_san")
    @classmethod
    def _san(cls, value: list[str] | None) -> list[str] | None:
        for entry in value or ():
            parse_san(entry)
        return value

    @field_validator("tls_fingerprint_sha256")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        return None if value is None else normalize_fingerprint(value)

    @property
    def has_identity(self) -> bool:
        return bool(self.tls_subject or self.tls_san or self.tls_fingerprint_sha256)

    @model_validator(mode="after")
    def _identity_needs_tls(self) -> AllowedCaller:
        if self.has_identity and not self.require_tls:
            if "require_tls" in self.model_fields_set:
                raise ValueError(
                    "tls_subject / tls_san / tls_fingerprint_sha256 need TLS: "
                    "leave require_tls out or set it to true"
                )
            self.require_tls = True
        return self

    def identity_problem(self, cert: PeerCertificate | None) -> str | None:
        """Why `cert` is not this caller's certificate; None when it is (or no identity)."""
        if not self.has_identity:
            return None
        return identity_mismatch(cert, self.tls_subject, self.tls_san, self.tls_fingerprint_sha256)


#: Per-destination TLS; the model lives in `dicom_node.tls` (kept under its old name).
TLSSection = TLSSettings


DESTINATION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


def _not_reserved(cls: type, value: str) -> str:
    if value == SENDER:
        raise ValueError(f"{SENDER!r} is reserved for routing")
    return value


#: Keys that would put a secret into the config file itself
_INLINE_SECRETS = ("password", "token", "secret", "api_key", "bearer")


def _no_inline_secret(cls: type, data: Any) -> Any:
    """Refuse a password or token written into the TOML, with the keys to use instead."""
    if isinstance(data, Mapping):
        for key in data:
            if str(key).lower() in _INLINE_SECRETS:
                raise ValueError(
                    f"{key!r}: secrets are not read from the config file; put it in a file "
                    "(auth.secret_file, readable by the node only) or an environment "
                    "variable (auth.secret_env)"
                )
    return data


def validate_base_url(value: str) -> str:
    """A DICOMweb base URL: http(s), a host, no credentials, query or fragment; no trailing /."""
    from urllib.parse import urlsplit

    text = value.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"url {text!r} does not parse: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"url {text!r} must start with https:// (or http://)")
    if not parts.hostname:
        raise ValueError(f"url {text!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "url must not hold credentials (user:password@); use the auth table with "
            "secret_file or secret_env"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"url {text!r} must be the service's base URL, without ? or #")
    if port == 0:
        raise ValueError(f"url {text!r}: port 0")
    return text.rstrip("/")


class DicomDestination(_Section):
    """A peer that receives results by C-STORE (`kind = "dicom"`, the default), usually the PACS."""

    kind: Literal["dicom"] = "dicom"
    name: str = Field(pattern=DESTINATION_NAME)
    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle | None = Field(
        None, description="AE title the node uses towards this peer (default: node.ae_title)"
    )
    timeout_s: float = Field(30.0, gt=0)
    tls: TLSSection = Field(default_factory=TLSSection)

    _name = field_validator("name")(_not_reserved)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def secure(self) -> bool:
        return self.tls.enabled

    @property
    def endpoint(self) -> tuple[str, str, int]:
        """(AE title, host, port) as a delivery row keeps them."""
        return self.ae_title, self.host, self.port


class DicomWebAuth(_Section):
    """`[destinations.auth]`: HTTP authentication towards a DICOMweb destination.

    The secret (basic: the password; bearer: the token) is read from `secret_file` or the
    environment variable `secret_env` at each attempt, so it can be rotated without a
    restart; it is never part of the config file, never printed and never logged.
    """

    type: Literal["basic", "bearer"]
    username: str | None = Field(None, min_length=1, description="basic: the user name")
    secret_file: Path | None = Field(None, description="file holding the password or token")
    secret_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="env var with the password/token"
    )

    _inline = model_validator(mode="before")(_no_inline_secret)

    @model_validator(mode="after")
    def _consistent(self) -> DicomWebAuth:
        if (self.secret_file is None) == (self.secret_env is None):
            raise ValueError("auth needs exactly one of secret_file or secret_env")
        if self.type == "basic" and not self.username:
            raise ValueError('auth.type = "basic" needs a username')
        if self.type == "bearer" and self.username:
            raise ValueError('auth.type = "bearer" takes no username (the token says who)')
        return self


class DicomWebDestination(_Section):
    """A DICOMweb archive that receives results by STOW-RS (`kind = "dicomweb"`).

    `url` is the service's base URL (STOW-RS `POST {url}/studies`, QIDO-RS for `echo`),
    e.g. `https://pacs.example.org/dicom-web`. `ca_file`: the CA bundle (PEM) that signs
    the server's certificate, instead of the system's; `verify_tls = false` is for tests
    only.
    """

    kind: Literal["dicomweb"]
    name: str = Field(pattern=DESTINATION_NAME)
    url: str
    auth: DicomWebAuth | None = None
    verify_tls: bool = True
    ca_file: Path | None = None
    timeout_s: float = Field(30.0, gt=0)

    _name = field_validator("name")(_not_reserved)
    _inline = model_validator(mode="before")(_no_inline_secret)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return validate_base_url(value)

    @model_validator(mode="after")
    def _tls(self) -> DicomWebDestination:
        if self.ca_file is not None and not self.url.startswith("https://"):
            raise ValueError("ca_file is for https:// URLs; this url is plain http")
        if self.ca_file is not None and not self.verify_tls:
            raise ValueError("ca_file with verify_tls = false: the CA would not be used")
        return self

    @property
    def address(self) -> str:
        return self.url

    @property
    def secure(self) -> bool:
        return self.url.startswith("https://")

    @property
    def endpoint(self) -> tuple[str, str, int]:
        """(AE title, host, port) as a delivery row keeps them: no AE title, the URL's host."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        return "", parts.hostname or "", parts.port or (443 if self.secure else 80)


def _kind(value: Any) -> str:
    """The tag of a destination table: its `kind`, "dicom" when left out."""
    if isinstance(value, Mapping):
        return str(value.get("kind", "dicom"))
    return str(getattr(value, "kind", "dicom"))


_DESTINATION_KINDS = ("dicom", "dicomweb")

#: One `[[destinations]]` entry: C-STORE (`kind = "dicom"`, the default) or STOW-RS.
Destination = Annotated[
    Annotated[DicomDestination, Tag("dicom")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(
        _kind,
        custom_error_type="destination_kind",
        custom_error_message='kind must be "dicom" (C-STORE, the default) or "dicomweb" (STOW-RS)',
    ),
]


class RoutingSection(_Section):
    """`[routing]`: which destinations get the results of a series.

    Targets are destination names, or "sender" = the destination whose AE title equals the
    calling AE title of the association that delivered the series.
    """

    default: list[str] = Field(default_factory=lambda: [SENDER])
    by_calling_ae: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("by_calling_ae")
    @classmethod
    def _keys_are_ae_titles(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return {validate_ae_title(k): v for k, v in value.items()}


class CompletionSection(_Section):
    """`[completion]`: when a series counts as complete."""

    idle_seconds: float = Field(10.0, gt=0, description="no new instance for this long")
    interrupted_idle_seconds: float = Field(
        300.0,
        gt=0,
        description="idle time instead, when the last association of the series was aborted "
        "or dropped (the sender may be resending)",
    )
    poll_interval_s: float = Field(1.0, gt=0)


class ModelSection(_Section):
    """`[model]`: the checkpoint the worker loads (None = the shipped one)."""

    checkpoint: Path | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    # auto: OpenVINO on a CPU where `ctmtl[openvino]` is installed, else torch (always on CUDA)
    engine: Literal["auto", "torch", "openvino"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"  # int8: OpenVINO only
    # slices per forward pass; unset: 2 on a CPU (as fast as 16 there, with about 1 GiB
    # less memory), 16 on a GPU (`mtl_model.predictor.CPU_BATCH`, `ACCELERATOR_BATCH`)
    batch_size: int | None = Field(None, ge=1)
    compile: bool = False
    # one blank batch through the network at start, so the first series pays no GPU set-up
    # or compilation; auto: on a GPU only (on a CPU it would lengthen every start by
    # seconds to gain a fraction of a series' minute)
    warm_up: Literal["auto", "yes", "no"] = "auto"


class MetricsSection(_Section):
    """`[metrics]`: Prometheus /metrics and /healthz, /readyz over HTTP (no TLS, no auth:
    keep it on loopback or a management network)."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(9150, ge=0, le=65535, description="0 = any free port")


class DatabaseSection(_Section):
    """`[database]`: any SQLAlchemy URL; empty = SQLite file in the spool folder."""

    url: str | None = None
    echo: bool = False


class SpoolSection(_Section):
    """`[spool]`: where received instances and results are kept, and for how long."""

    path: Path = Path("var/spool")
    retention_days: float | None = Field(
        7.0, ge=0, description="delete files of finished series after this; none = keep"
    )
    min_free_mb: float = Field(1024.0, ge=0, description="refuse instances below this")


class WorkerSection(_Section):
    """`[worker]`: job execution in this process."""

    enabled: bool = True
    lease_seconds: float = Field(300.0, gt=0)
    poll_interval_s: float = Field(1.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_delay_s: float = Field(30.0, ge=0)
    decode_workers: int = Field(
        -1,
        ge=-1,
        le=64,
        description="processes that decode compressed slices (JPEG, JPEG 2000, RLE) in "
        "parallel, kept for the worker's life: the codecs hold the GIL, so one thread "
        "decodes a 300-slice JPEG Lossless series in seconds; -1 = one per CPU core, at "
        "most 8; 0 or 1 = in the worker thread",
    )


class ExportSection(_Section):
    """`[export]`: C-STORE of results, retried with exponential backoff."""

    enabled: bool = True
    max_attempts: int = Field(
        80, ge=1, description="with the default backoff (5 s doubling to 600 s) about 12 h"
    )
    initial_backoff_s: float = Field(5.0, ge=0)
    max_backoff_s: float = Field(600.0, ge=0)
    poll_interval_s: float = Field(1.0, gt=0)
    lease_seconds: float = Field(300.0, gt=0)
    max_parallel: int = Field(4, ge=1, description="destinations served at the same time")
    recheck_failed_s: float = Field(
        300.0,
        ge=0,
        description="C-ECHO destinations with failed deliveries this often and queue them "
        "again when the echo succeeds; 0 = never",
    )


class BackoffSection(_Section):
    """`[backoff]`: how the completion, worker and export loops wait after an error
    (database unavailable, disk full): `initial_s` doubling up to `max_s`, jittered."""

    initial_s: float = Field(1.0, gt=0)
    max_s: float = Field(60.0, gt=0)


class NodeConfig(_Section):
    """The whole file. `source` is where it was read from (None for pure defaults)."""

    node: NodeSection = Field(default_factory=NodeSection)
    allowed_callers: list[AllowedCaller] = Field(
        default_factory=list, description="empty = any calling AE title"
    )
    destinations: list[Destination] = Field(default_factory=list)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    selection: SelectionRules = Field(default_factory=SelectionRules)
    completion: CompletionSection = Field(default_factory=CompletionSection)
    model: ModelSection = Field(default_factory=ModelSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    spool: SpoolSection = Field(default_factory=SpoolSection)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    export: ExportSection = Field(default_factory=ExportSection)
    backoff: BackoffSection = Field(default_factory=BackoffSection)
    results: ResultOptions = Field(default_factory=ResultOptions)
    metrics: MetricsSection = Field(default_factory=MetricsSection)

    @model_validator(mode="after")
    def _references(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names are not unique: {dupes}")
        known = set(names) | {SENDER}
        targets = list(self.routing.default)
        for ae, lst in self.routing.by_calling_ae.items():
            targets += lst
            if self.allowed_callers and ae not in {c.ae_title for c in self.allowed_callers}:
                raise ValueError(f"routing.by_calling_ae names {ae!r}, not an allowed caller")
        unknown = sorted(set(targets) - known)
        if unknown:
            raise ValueError(f"routing names unknown destination(s) {unknown}")
        tls_callers = [c.ae_title for c in self.allowed_callers if c.require_tls]
        if tls_callers and not self.node.tls.enabled:
            raise ValueError(f"allowed callers {tls_callers} require TLS but node.tls is off")
        pinned = [c.ae_title for c in self.allowed_callers if c.has_identity]
        if pinned and not self.node.tls.verify_peer:
            raise ValueError(
                f"allowed callers {pinned} name a TLS certificate identity but "
                "node.tls.verify_peer is false (the node would not ask for certificates)"
            )
        if self.metrics.enabled and self.metrics.port:
            tls_port = self.node.tls.port if self.node.tls.enabled else None
            for key, port in (("node.port", self.node.port), ("node.tls.port", tls_port)):
                if port == self.metrics.port:
                    raise ValueError(
                        f"metrics.port {port} is also {key}: give the metrics endpoint a port "
                        "of its own"
                    )
        return self

    # ----------------------------------------------------------------- helpers

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.spool.path / 'ctmtl-node.db').as_posix()}"

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"no destination named {name!r}")

    def destination_for_ae(self, ae_title: str) -> DicomDestination | None:
        """The C-STORE destination with this AE title (routing target "sender")."""
        for dest in self.destinations:
            if isinstance(dest, DicomDestination) and dest.ae_title == ae_title.strip():
                return dest
        return None

    def route(self, calling_ae: str | None) -> tuple[list[Destination], list[str]]:
        """Destinations for results of a series sent by `calling_ae`, plus problems found."""
        targets = self.routing.by_calling_ae.get((calling_ae or "").strip(), self.routing.default)
        out: list[Destination] = []
        problems: list[str] = []
        for target in targets:
            dest: Destination | None
            if target == SENDER:
                dest = self.destination_for_ae(calling_ae or "")
                if dest is None:
                    problems.append(f"no destination configured for calling AE {calling_ae!r}")
                    continue
            else:
                dest = self.destination(target)
            if dest.name not in {d.name for d in out}:
                out.append(dest)
        return out, problems

    def caller_allowed(self, ae_title: str, host: str | None) -> bool:
        if not self.allowed_callers:
            return True
        for caller in self.allowed_callers:
            if caller.ae_title == ae_title.strip() and (caller.host in (None, host)):
                return True
        return False

    def caller_identity_problem(
        self, ae_title: str, host: str | None, cert: PeerCertificate | None
    ) -> str | None:
        """Why the caller's TLS certificate is not the one `allowed_callers` names for it.

        None when a matching entry (AE title, host) names no identity or one that `cert`
        matches; else the reasons of each matching entry.
        """
        entries = [
            c
            for c in self.allowed_callers
            if c.ae_title == ae_title.strip() and c.host in (None, host)
        ]
        problems = []
        for caller in entries:
            problem = caller.identity_problem(cert)
            if problem is None:
                return None
            problems.append(problem)
        return "; ".join(dict.fromkeys(problems)) or None

    def caller_requires_tls(self, ae_title: str, host: str | None) -> bool:
        """True when the matching allowed-caller entry demands TLS."""
        return any(
            c.require_tls and c.ae_title == ae_title.strip() and c.host in (None, host)
            for c in self.allowed_callers
        )


class StartupError(RuntimeError):
    """The node cannot start as configured (a port in use, ...); the message names the key.

    `exit_code` is what `serve`/`worker` exit with: 2 for what only a change of the
    configuration or the files it names can fix (systemd does not restart it), 1 for what
    may pass by itself (a port in use, the database server not reachable yet).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def port_in_use(cls, key: str, bind: str, port: int, what: str, exc: OSError) -> StartupError:
        return cls(
            f"{key}: cannot listen on {bind}:{port} for {what}: {exc.strerror or exc}; "
            f"another program (or another ctmtl-node on this host) may use port {port}: "
            f"stop it or set {key} to a free port"
        )


class ConfigError(Exception):
    """A config that cannot be read or validated; `errors` lists `(key path, message)`."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"invalid configuration {source}:\n{lines}")


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict from `CTMTL_SECTION__KEY=value` variables (others are ignored)."""
    out: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if any(not p for p in parts):
            continue
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = _parse_env_value(raw)
    return out


def merge_tables(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of TOML tables: env overrides, CLI overrides and test configs use it."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_tables(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_paths(cfg: NodeConfig, base: Path) -> NodeConfig:
    cfg.spool.path = _resolve(cfg.spool.path, base) or cfg.spool.path
    cfg.model.checkpoint = _resolve(cfg.model.checkpoint, base)
    for tls in [
        cfg.node.tls,
        *(d.tls for d in cfg.destinations if isinstance(d, DicomDestination)),
    ]:
        for key in ("ca_file", "cert_file", "key_file"):
            setattr(tls, key, _resolve(getattr(tls, key), base))
    for dest in cfg.destinations:
        if isinstance(dest, DicomWebDestination):
            dest.ca_file = _resolve(dest.ca_file, base)
            if dest.auth is not None:
                dest.auth.secret_file = _resolve(dest.auth.secret_file, base)
    url = cfg.database.url
    if url and url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rel = url[len("sqlite:///") :]
        if rel and rel != ":memory:":
            cfg.database.url = f"sqlite:///{(base / rel).resolve().as_posix()}"
    return cfg


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = list(err["loc"])
        if len(loc) > 2 and loc[0] == "destinations" and loc[2] in _DESTINATION_KINDS:
            del loc[2]  # the union's tag: `destinations.0.url`, as it is written
        path = ".".join(str(p) for p in loc) or "(top level)"
        out.append((path, err["msg"]))
    return out


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Read, merge env overrides, validate and resolve paths; raise `ConfigError`.

    `path=None` gives the embedded defaults, with relative paths resolved against the
    current directory.
    """
    source = str(path) if path is not None else "(defaults)"
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(source, [("(file)", "file not found")]) from None
        except OSError as exc:
            raise ConfigError(source, [("(file)", str(exc))]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, [("(syntax)", str(exc))]) from None
        base = p.resolve().parent
    data = merge_tables(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = merge_tables(data, overrides)
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _errors(exc)) from None
    cfg = _resolve_paths(cfg, base)
    _register_secrets(cfg)
    return cfg


def _register_secrets(cfg: NodeConfig) -> None:
    """Make the loaded config's secrets known to `dicom_node.redact.mask_secrets`."""
    from dicom_node.redact import register_secret, register_url_password

    register_url_password(cfg.database.url)
    for tls in [
        cfg.node.tls,
        *(d.tls for d in cfg.destinations if isinstance(d, DicomDestination)),
    ]:
        if tls.key_password_env:
            register_secret(os.environ.get(tls.key_password_env))
    for dest in cfg.destinations:
        if isinstance(dest, DicomWebDestination) and dest.auth and dest.auth.secret_env:
            register_secret(os.environ.get(dest.auth.secret_env))


def effective_toml(cfg: NodeConfig) -> str:
    """The effective config as TOML-like text (for `config check`)."""
    from dicom_node.redact import MASK, mask_secrets

    data = cfg.model_dump(mode="json", exclude_none=True)
    data["database"]["url"] = cfg.database_url
    return mask_secrets(_to_toml(_mask_secret_keys(data, MASK)))


_SECRET_KEY = re.compile(r"(?i)(password|passwd|secret|token|api_key)(?!_env|_file)")


def _mask_secret_keys(data: Any, mask: str) -> Any:
    """Values of keys named like a secret (`password`, `token`, ...) replaced by `mask`."""
    if isinstance(data, dict):
        return {
            k: mask
            if isinstance(v, str) and v and _SECRET_KEY.search(k)
            else _mask_secret_keys(v, mask)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_mask_secret_keys(v, mask) for v in data]
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return _toml_value(str(value))


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        is_table_list = (
            isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        )
        if isinstance(value, dict) or is_table_list:
            tables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_toml_value(value)}")
    for key, value in tables:
        name = f"{prefix}{_key(key)}"
        if isinstance(value, dict):
            lines += ["", f"[{name}]", _to_toml(value, name + ".").strip("\n")]
        else:
            for item in value:
                lines += ["", f"[[{name}]]", _to_toml(item, name + ".").strip("\n")]
    return "\n".join(line for line in lines if line is not None) + "\n"
