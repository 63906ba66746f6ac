"""Fixtures for the operations tests: a real PostgreSQL server, TLS material, node processes,
configs and C-STORE with pynetdicom. The receiving PACS (DCMTK storescp), in-process nodes
and the tiny checkpoint are shared (tests/conftest.py, tests/helpers.py)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import merge_tables
from helpers import NODE_CLI, REPO, free_port, stop_process
from ops.certs import TestPKI, make_ca

# --------------------------------------------------------------------------- PostgreSQL


def _pg_bindir() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """A throw-away cluster: initdb in a temp folder, loopback only, a free port.

    PostgreSQL refuses to run as root, so as root the server runs as the `postgres`
    system user (`runuser`). Trust authentication on 127.0.0.1 only; fsync off (tests).
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ctmtl-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no `postgres` user to run the server")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(
            [str(bindir / "initdb"), "-D", str(self.data), "-U", "ctmtl", "--auth=trust",
             "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]
        )  # fmt: skip
        self._run(
            [str(bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
             "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
             "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
             "-c max_connections=200", "start"]
        )  # fmt: skip

    def _run(self, cmd: Sequence[str]) -> None:
        proc = subprocess.run(
            [*self._as, *cmd], capture_output=True, text=True, timeout=120, cwd=self.root
        )
        if proc.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{cmd[0]} failed: {proc.stdout}{proc.stderr}{log}")

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; return its SQLAlchemy URL."""
        self._run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "ctmtl",
             "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{name}"']
        )  # fmt: skip
        return f"postgresql+psycopg2://ctmtl@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]
            )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (apt install postgresql)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 not installed (pip install -e .[postgres])")
    server = PostgresServer(bindir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh database per test on the session's server."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    name = f"{name}_{os.getpid()}_{int(time.time() * 1000) % 100000}"
    return postgres.create_database(name)


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A site CA with node, PACS and client certificates, and an unrelated rogue CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    base = tmp_path_factory.mktemp("pki")
    site: TestPKI = make_ca(base / "site", cn="ctmtl test site CA")
    rogue: TestPKI = make_ca(base / "rogue", cn="rogue CA")
    return {
        "ca": site.ca_cert,
        "node": site.issue("node", "ctmtl-node", server=True),
        "pacs": site.issue("pacs", "pacs.example", server=True),
        "client": site.issue("client", "storescu-client", server=False),
        "rogue_ca": rogue.ca_cert,
        "rogue_client": rogue.issue("rogue-client", "intruder", server=False),
    }


# --------------------------------------------------------------------------- peers


class NodeProcess:
    """`ctmtl-node ARGS` as a child process with its log in a file."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = log.open("w")
        full_env = dict(os.environ)
        full_env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*NODE_CLI, *args], stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 60) -> int:
        stop_process(self.proc, timeout)
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def start(*args: str, name: str = "node", env: dict[str, str] | None = None) -> NodeProcess:
        proc = NodeProcess(args, tmp_path / f"{name}.log", env)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


# --------------------------------------------------------------------------- configs


def base_sections(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """Config data for a test node: temp spool, free ports, short timings, 8-slice series."""
    base: dict[str, Any] = {
        "node": {"port": 0, "ae_title": "CTMTL", "stop_timeout_s": 10},
        "spool": {"path": str(tmp_path / "spool"), "min_free_mb": 0},
        "completion": {"idle_seconds": 1.0, "poll_interval_s": 0.2},
        "selection": {"min_slices": 8},
        "worker": {"poll_interval_s": 0.2, "retry_delay_s": 0.5},
        "export": {"poll_interval_s": 0.2, "initial_backoff_s": 0.2, "max_backoff_s": 1.0},
        # OpenVINO: own tests; warm_up "yes" as on a GPU (a tiny network: no cost here)
        "model": {"device": "cpu", "batch_size": 8, "engine": "torch", "warm_up": "yes"},
        "metrics": {"enabled": True, "port": 0},
    }
    return merge_tables(base, sections)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Any]:
    from dicom_node.config import load_config

    def make(**sections: Any) -> Any:
        return load_config(None, environ={}, overrides=base_sections(tmp_path, **sections))

    return make


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Tables of scalars, `[[arrays]]` of tables and one level of sub-tables."""
    lines: list[str] = []
    for section, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                subs = {k: v for k, v in item.items() if isinstance(v, dict)}
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items() if k not in subs]
                for sub, values in subs.items():
                    lines.append(f"[{section}.{sub}]")
                    lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
            continue
        lines.append(f"[{section}]")
        subs = {k: v for k, v in body.items() if isinstance(v, dict) and v}
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items() if k not in subs]
        for sub, values in subs.items():
            lines.append(f"[{section}.{sub}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def send_files(
    port: int, files: Sequence[Path], calling_ae: str = "PACS", tls: Any = None
) -> list[int]:
    """C-STORE `files` with pynetdicom over one association; statuses (empty if refused)."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="CTMTL", tls_args=tls)
    if not assoc.is_established:
        return []
    try:
        statuses = []
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            statuses.append(int(status.Status) if status and "Status" in status else -1)
        return statuses
    finally:
        assoc.release()
