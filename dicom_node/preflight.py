"""Checks made before a node process starts any thread, and by `ctmtl-node config check`.

A node that cannot do its work must not accept any: `serve` and `worker` check what they
need (TLS files and key permissions, the model checkpoint, the database) before the first
thread starts, and refuse to start with one line per problem, naming the config key, the
file or URL (password masked) and the cause.

Each problem has a level:

- `error`: only a change of the configuration or of the files it names helps (missing or
  corrupt checkpoint, unreadable TLS key, bad database URL, missing driver, wrong
  password, a `pg_hba.conf` rejection, a missing database or role, a corrupt or emptied
  SQLite file). `serve`/`worker` exit 2, which the systemd units do not restart.
- `unavailable`: may pass by itself (the database server not reachable yet, too many
  connections, starting up). `serve`/`worker` exit 1 and systemd restarts them;
  `config check` only warns, since the configuration itself may well be right.
- `warning`: logged (start) or printed (`config check`); nothing is refused.

SQLite rules: an existing file must open as a database (`PRAGMA schema_version` reads its
header; at start `PRAGMA quick_check` reads every page). An existing file of 0 bytes is a
new database only while the spool holds no received data (`incoming/` and `results/`
empty); with data there, the file was emptied (a failed copy or restore, a full disk, a
stray `> file`) and the node's whole history (series, jobs, deliveries) is gone, so the
node refuses to start rather than silently make a new, empty one. A *missing* file with
data in the spool is taken as a deliberate fresh start (the file was removed) and only
warned about.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dicom_node.config import DicomDestination, DicomWebDestination, NodeConfig, StartupError
from dicom_node.redact import mask_secrets

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)

Level = Literal["error", "unavailable", "warning"]

#: Markers of database connection errors that a restart does not fix (libpq texts).
_PERMANENT = (
    "password authentication failed",
    "authentication failed",
    "no password supplied",
    "pg_hba.conf",
    "does not exist",
    "permission denied",
    "invalid dsn",
    "invalid connection option",
    "invalid sslmode",
    "invalid integer value",
)


@dataclass(frozen=True)
class Problem:
    """One finding: the config key it is about, what is wrong, and how bad it is."""

    key: str
    message: str
    level: Level = "error"

    @property
    def line(self) -> str:
        """`key: message` on one line, secrets masked."""
        return mask_secrets(" ".join(f"{self.key}: {self.message}".split()))


def one_line(text: object) -> str:
    """Collapse a (driver's multi-line) message or exception into one line, secrets masked."""
    return mask_secrets(" ".join(str(text).split()))


# --------------------------------------------------------------------------- TLS


def tls_problems(cfg: NodeConfig, inbound: bool = True, outbound: bool = True) -> list[Problem]:
    """The TLS files load (and private keys are not readable by every user)."""
    from dicom_node.tls import TLSConfigError, client_context, server_context

    problems: list[Problem] = []
    if inbound and cfg.node.tls.enabled:
        try:
            server_context(cfg.node.tls)
        except (TLSConfigError, OSError) as exc:
            problems.append(Problem("node.tls", str(exc)))
    if outbound:
        for i, dest in enumerate(cfg.destinations):
            if isinstance(dest, DicomDestination) and dest.tls.enabled:
                try:
                    client_context(dest.tls)
                except (TLSConfigError, OSError) as exc:
                    problems.append(Problem(f"destinations.{i}.tls", f"{dest.name}: {exc}"))
    return problems


# --------------------------------------------------------------------------- DICOMweb

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def dicomweb_problems(cfg: NodeConfig) -> list[Problem]:
    """Each DICOMweb destination's secret can be read and its CA file loads.

    The secret itself is never part of a message. Warnings: a secret file other users may
    read, credentials sent over plain http to another host.
    """
    import ssl
    from urllib.parse import urlsplit

    from dicom_node.dicomweb import SecretError, read_secret, secret_file_readable_by_others

    problems: list[Problem] = []
    for i, dest in enumerate(cfg.destinations):
        if not isinstance(dest, DicomWebDestination):
            continue
        key = f"destinations.{i}"
        if dest.ca_file is not None:
            try:
                ssl.create_default_context(cafile=str(dest.ca_file))
            except (OSError, ssl.SSLError) as exc:
                problems.append(
                    Problem(f"{key}.ca_file", f"{dest.name}: {dest.ca_file} does not load: {exc}")
                )
        if dest.auth is None:
            continue
        try:
            read_secret(dest.auth)
        except SecretError as exc:
            problems.append(Problem(f"{key}.auth", f"{dest.name}: {exc}"))
            continue
        if secret_file_readable_by_others(dest.auth):
            problems.append(
                Problem(
                    f"{key}.auth.secret_file",
                    f"{dest.name}: {dest.auth.secret_file} is readable by other users "
                    "(chmod 600, or use systemd LoadCredential)",
                    "warning",
                )
            )
        if not dest.secure and urlsplit(dest.url).hostname not in _LOOPBACK:
            problems.append(
                Problem(
                    f"{key}.url",
                    f"{dest.name}: {dest.auth.type} credentials go over plain http to "
                    f"{urlsplit(dest.url).hostname}; use https://",
                    "warning",
                )
            )
    return problems


# --------------------------------------------------------------------------- model


def checkpoint_path(cfg: NodeConfig) -> Path:
    """The file the worker loads: `model.checkpoint`, else the shipped one (or env)."""
    if cfg.model.checkpoint is not None:
        return Path(cfg.model.checkpoint)
    from mtl_model.checkpoint import default_checkpoint_path

    return default_checkpoint_path()


def checkpoint_problems(cfg: NodeConfig, required: bool) -> list[Problem]:
    """The checkpoint exists, is readable and its header and metadata are valid.

    A configured `model.checkpoint` is always checked; the shipped default only when
    `required` (a process that runs a worker), so an SCP-only host needs no model.
    """
    if cfg.model.checkpoint is None and not required:
        return []
    path = checkpoint_path(cfg)
    shipped = "" if cfg.model.checkpoint is not None else " (the shipped checkpoint)"
    if not path.exists():
        return [Problem("model.checkpoint", f"file {path}{shipped} does not exist")]
    if not path.is_file():
        return [Problem("model.checkpoint", f"{path}{shipped} is not a file")]
    if not os.access(path, os.R_OK):
        return [Problem("model.checkpoint", f"file {path}{shipped} is not readable by this user")]
    from mtl_model.checkpoint import CheckpointError, read_metadata

    try:
        read_metadata(path)
    except CheckpointError as exc:
        return [Problem("model.checkpoint", str(exc))]
    except Exception as exc:  # an unexpected reader error is a broken file all the same
        return [Problem("model.checkpoint", f"checkpoint {path}: unreadable ({exc})")]
    return []


# --------------------------------------------------------------------------- database


def describe_db_error(exc: BaseException) -> tuple[str, bool]:
    """(one masked line with the driver's own message, whether it may pass by itself)."""
    orig = getattr(exc, "orig", None)
    text = one_line(str(orig if orig is not None else exc)) or type(exc).__name__
    low = text.lower()
    transient = not any(marker in low for marker in _PERMANENT)
    return text, transient


def database_url_problems(url: str) -> list[Problem]:
    """The URL parses, names a known dialect whose driver is installed (no connection)."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError
    from sqlalchemy.pool import NullPool

    shown = mask_secrets(url)
    try:
        engine = create_engine(url, poolclass=NullPool)
    except ArgumentError as exc:
        return [Problem("database.url", f"{shown} is not a usable database URL: {one_line(exc)}")]
    except ImportError as exc:
        return [
            Problem(
                "database.url",
                f"{shown}: the database driver is not installed ({one_line(exc)}); "
                f"{_driver_hint(url)}",
            )
        ]
    except Exception as exc:  # e.g. a bad query argument a dialect refuses
        return [Problem("database.url", f"{shown} is not a usable database URL: {one_line(exc)}")]
    engine.dispose()
    return []


def _driver_hint(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        backend = make_url(url).get_backend_name()
    except Exception:
        backend = ""
    if backend == "postgresql":
        return (
            "the node is tested with psycopg2: write the URL as postgresql+psycopg2://... "
            "and install it with pip install 'ctmtl[postgres]'"
        )
    return "install the driver or fix the URL (SQLite and PostgreSQL are supported)"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.query.get("uri"):
        return None
    name = parsed.database
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(name).expanduser().absolute()


def spool_has_data(spool_root: Path) -> bool:
    """Anything received or produced: an entry in `incoming/` or `results/`."""
    for sub in ("incoming", "results"):
        folder = spool_root / sub
        try:
            if folder.is_dir() and any(folder.iterdir()):
                return True
        except OSError:
            continue
    return False


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def sqlite_problems(path: Path, spool_root: Path, thorough: bool) -> list[Problem]:
    """The file opens as an intact database, or can be created (see the module rules)."""
    key = "database.url"
    if not path.exists():
        folder = _nearest_existing(path.parent)
        if not folder.is_dir():
            return [Problem(key, f"cannot create SQLite database {path}: {folder} is not a folder")]
        if not os.access(folder, os.W_OK | os.X_OK):
            return [Problem(key, f"cannot create SQLite database {path}: {folder} is not writable")]
        if spool_has_data(spool_root):
            return [
                Problem(
                    key,
                    f"SQLite database {path} does not exist while the spool {spool_root} holds "
                    "received data: starting with a new, empty database that does not know "
                    "those series",
                    "warning",
                )
            ]
        return []
    if not path.is_file():
        return [Problem(key, f"SQLite database {path} is not a file")]
    if not os.access(path, os.R_OK | os.W_OK):
        return [Problem(key, f"SQLite database {path} is not readable and writable by this user")]
    if path.stat().st_size == 0:
        if spool_has_data(spool_root):
            return [
                Problem(
                    key,
                    f"SQLite database {path} is empty (0 bytes) while the spool {spool_root} "
                    "holds received data: the database was emptied and the node's history "
                    "(series, jobs, deliveries) is lost; restore it from a backup, or move "
                    "the empty file away to start with a new database",
                )
            ]
        return []  # an empty file and an empty spool: a new database
    return _sqlite_integrity(path, thorough)


def _sqlite_integrity(path: Path, thorough: bool) -> list[Problem]:
    key = "database.url"
    advice = "restore it from a backup, or move it away to start with a new database"
    try:
        con = sqlite3.connect(str(path), timeout=30)
    except sqlite3.Error as exc:
        return [Problem(key, f"cannot open SQLite database {path}: {exc}")]
    try:
        if thorough:
            rows = [str(r[0]) for r in con.execute("PRAGMA quick_check(3)").fetchall()]
        else:
            con.execute("PRAGMA schema_version").fetchall()
            rows = ["ok"]
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorname", "")
        if code in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            return [Problem(key, f"SQLite database {path} is locked: {exc}", "unavailable")]
        if code in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or not isinstance(
            exc, sqlite3.OperationalError
        ):
            return [Problem(key, f"SQLite database {path} is corrupt ({exc}); {advice}")]
        return [Problem(key, f"cannot read SQLite database {path}: {exc}")]
    finally:
        con.close()
    if rows != ["ok"]:
        return [
            Problem(key, f"SQLite database {path} is corrupt (quick_check: {rows[0]}); {advice}")
        ]
    return []


def connect_problems(url: str) -> list[Problem]:
    """A server database answers `SELECT 1` (new connection, connect timeout)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from dicom_node.db import connect_timeout_args

    engine: Engine | None = None
    try:
        engine = create_engine(url, poolclass=NullPool, connect_args=connect_timeout_args(url))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        line, transient = describe_db_error(exc)
        level: Level = "unavailable" if transient else "error"
        return [Problem("database.url", f"cannot connect to {mask_secrets(url)}: {line}", level)]
    finally:
        if engine is not None:
            engine.dispose()
    return []


def database_problems(
    cfg: NodeConfig, connect: bool = True, thorough: bool = False
) -> list[Problem]:
    """The URL is usable; SQLite: the file checks; others: a connection (when `connect`)."""
    url = cfg.database_url
    problems = database_url_problems(url)
    if problems:
        return problems
    path = sqlite_path(url)
    if path is not None:
        return sqlite_problems(path, cfg.spool.path, thorough)
    if connect:
        return connect_problems(url)
    return []


# --------------------------------------------------------------------------- together


def spool_problems(cfg: NodeConfig) -> list[Problem]:
    root = cfg.spool.path
    if root.exists() and not root.is_dir():
        return [Problem("spool.path", f"{root} exists and is not a folder")]
    return []


def config_problems(cfg: NodeConfig, connect: bool = True) -> list[Problem]:
    """Everything `config check` looks at beyond the schema."""
    return [
        *tls_problems(cfg),
        *dicomweb_problems(cfg),
        *checkpoint_problems(cfg, required=cfg.worker.enabled),
        *spool_problems(cfg),
        *database_problems(cfg, connect=connect, thorough=False),
    ]


def startup_problems(
    cfg: NodeConfig, *, inbound_tls: bool, outbound_tls: bool, model: bool
) -> list[Problem]:
    """What a node process with these parts needs before it starts any thread."""
    return [
        *tls_problems(cfg, inbound=inbound_tls, outbound=outbound_tls),
        *(dicomweb_problems(cfg) if outbound_tls else []),
        *(checkpoint_problems(cfg, required=True) if model else []),
        *spool_problems(cfg),
        *database_problems(cfg, connect=True, thorough=True),
    ]


def raise_for(problems: Iterable[Problem]) -> None:
    """Log the warnings; raise `StartupError` (one line per problem) for the rest.

    Exit code 2 when any problem is an `error`, 1 when all are `unavailable`.
    """
    refused: list[Problem] = []
    for problem in problems:
        if problem.level == "warning":
            logger.warning("%s", problem.line)
        else:
            refused.append(problem)
    if refused:
        code = 2 if any(p.level == "error" for p in refused) else 1
        raise StartupError("\n".join(p.line for p in refused), exit_code=code)
