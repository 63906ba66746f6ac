"""Issues 13.7 and 16.5: database faults at start-up are one line and an exit code, never a
traceback, a node that reports ready and refuses every instance, or lost history.

- a corrupt SQLite file (header or pages overwritten) is refused (exit 2) by `serve`,
  `worker`, `status` and `db upgrade`; `config check` sees a broken header;
- an emptied (0-byte) SQLite file while the spool holds received data is refused
  everywhere, and left as it is (not silently replaced by a new database);
- wrong URLs (`sqlite://var/x.db`, a dialect whose driver is missing, an unknown dialect,
  a path below a file) fail `config check` and `serve` with one line;
- PostgreSQL: wrong password, pg_hba.conf reject, missing database (exit 2), too many
  connections, server not reachable (exit 1: systemd restarts those), one line each;
- `/readyz`'s database check reads the schema, so it fails for a SQLite file without one
  and for a PostgreSQL database that stops accepting connections.

Real parts: `ctmtl-node` processes, real SQLite files, the real PostgreSQL test cluster.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ops import conftest as ops_fixtures
from ops.conftest import NodeProcess, base_sections, send_files, write_toml
from ops.synth import write_series

from dicom_node.db import Database
from dicom_node.metrics import database_check
from helpers import free_port, port_open, wait_for
from reliability import pg_roles
from reliability.nodes import run_node
from reliability.pg_roles import AuthPostgres

node_process = ops_fixtures.node_process  # fixtures used here, from their modules
postgres = ops_fixtures.postgres
pg_url = ops_fixtures.pg_url
pg_auth = pg_roles.pg_auth


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `error:` line of a refused command (and no traceback)."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


def node_toml(tmp_path: Path, checkpoint: Path, **sections: Any) -> tuple[Path, int]:
    port = free_port()
    ours: dict[str, Any] = {
        "node": {"port": port},
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "precision": "fp32"},
        "metrics": {"enabled": False},
        "export": {"enabled": False},
    }
    for key, value in sections.items():
        ours[key] = {**ours.get(key, {}), **value}
    return write_toml(tmp_path / "node.toml", base_sections(tmp_path, **ours)), port


def sqlite_file(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "ctmtl-node.db"


# --------------------------------------------------------------------------- SQLite


def _overwrite(path: Path, offset: int, n: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(os.urandom(n))


@pytest.mark.parametrize("damage", ["header", "pages"])
def test_corrupt_sqlite_database_is_refused_with_one_line(
    tmp_path: Path, tiny_checkpoint: Path, damage: str
) -> None:
    cfg, port = node_toml(tmp_path, tiny_checkpoint)
    assert run_node("db", "upgrade", "--config", str(cfg)).returncode == 0
    db = sqlite_file(tmp_path)
    page = 4096
    assert db.stat().st_size >= 6 * page
    if damage == "header":
        _overwrite(db, 0, 100)
        cause = "file is not a database"
    else:  # the header stays valid: only reading the pages finds it
        _overwrite(db, 2 * page, 3 * page)
        cause = "corrupt"
    commands = [["serve"], ["worker"], ["db", "upgrade"]]
    if damage == "header":  # admin commands read the header; start-up reads every page
        commands.append(["status"])
    for command in commands:
        proc = run_node(*command, "--config", str(cfg))
        assert proc.returncode == 2, (command, proc.stdout + proc.stderr)
        line = one_error(proc)
        assert line.startswith("error: "), line
        assert f"database.url: SQLite database {db} is corrupt" in line, line
        assert cause in line and "restore it from a backup" in line, line
    assert not port_open(port)
    check = run_node("config", "check", str(cfg))
    if damage == "header":
        assert check.returncode == 2 and "is corrupt (file is not a database)" in check.stderr
    else:  # `config check` reads the header only; the full check is at start
        assert check.returncode == 0, check.stderr


@pytest.mark.slow
def test_emptied_sqlite_database_is_refused_and_kept_while_the_spool_has_data(
    tmp_path: Path, tiny_checkpoint: Path, node_process: Callable[..., NodeProcess]
) -> None:
    cfg, port = node_toml(tmp_path, tiny_checkpoint)
    scp = node_process("serve", "--no-worker", "--config", str(cfg), name="first")
    wait_for(lambda: port_open(port) or not scp.alive(), 60, "the node to listen")
    _, files = write_series(tmp_path / "series", n_slices=8, size=32)
    assert send_files(port, files, "MODALITY") == [0] * 8
    assert scp.stop(30) == 0
    db = sqlite_file(tmp_path)
    assert db.stat().st_size > 0

    db.write_bytes(b"")  # emptied: a failed restore, a full disk, a stray `> file`
    for command in (["serve"], ["worker"], ["status"], ["db", "upgrade"], ["retry", "1"]):
        proc = run_node(*command, "--config", str(cfg))
        assert proc.returncode == 2, (command, proc.stdout + proc.stderr)
        line = one_error(proc)
        assert f"SQLite database {db} is empty (0 bytes)" in line, line
        assert "holds received data" in line and "history" in line, line
        assert db.stat().st_size == 0, command  # nothing replaced it with a new database
    check = run_node("config", "check", str(cfg))
    assert check.returncode == 2 and "is empty (0 bytes)" in check.stderr, check.stderr

    # the administrator moves the empty file away: a deliberate fresh start, with a warning
    db.rename(db.with_name("emptied.db"))
    node = node_process("serve", "--no-worker", "--config", str(cfg), name="fresh")
    wait_for(lambda: port_open(port) or not node.alive(), 60, "the node to listen again")
    assert node.alive(), node.log()
    assert f"SQLite database {db} does not exist while the spool" in node.log()
    assert node.stop(30) == 0
    assert db.stat().st_size > 0


def test_empty_sqlite_file_with_an_empty_spool_is_a_new_database(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    cfg, _ = node_toml(tmp_path, tiny_checkpoint)
    db = sqlite_file(tmp_path)
    db.parent.mkdir(parents=True)
    db.touch()
    proc = run_node("db", "upgrade", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "upgraded from empty" in proc.stdout


BAD_URLS = [
    ("sqlite relative netloc", "sqlite://var/x.db", "Invalid SQLite URL"),
    ("driver not installed", "mysql://ctmtl:Pw-mysql-1@db-host/ctmtl", "driver is not installed"),
    ("unknown dialect", "nosuchdb://db-host/ctmtl", "is not a usable database URL"),
    ("not a url", "ctmtl.db", "is not a usable database URL"),
]


@pytest.mark.parametrize(("url", "cause"), [b[1:] for b in BAD_URLS], ids=[b[0] for b in BAD_URLS])
def test_unusable_database_url_fails_config_check_and_serve(
    tmp_path: Path, tiny_checkpoint: Path, url: str, cause: str
) -> None:
    cfg, _ = node_toml(tmp_path, tiny_checkpoint, database={"url": url})
    check = run_node("config", "check", str(cfg))
    assert check.returncode == 2, check.stdout + check.stderr
    assert any(
        line.strip().startswith("database.url:") and cause in line
        for line in check.stderr.splitlines()
    ), check.stderr
    for command in ("serve", "worker"):
        proc = run_node(command, "--config", str(cfg))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = one_error(proc)
        assert line.startswith("error: database.url: ") and cause in line, line
        assert "Pw-mysql-1" not in proc.stdout + proc.stderr


def test_sqlite_path_below_a_file_fails_config_check_and_serve(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    url = f"sqlite:///{blocker}/db/ctmtl.db"
    cfg, _ = node_toml(tmp_path, tiny_checkpoint, database={"url": url})
    check = run_node("config", "check", str(cfg))
    assert check.returncode == 2 and f"{blocker} is not a folder" in check.stderr, check.stderr
    proc = run_node("serve", "--config", str(cfg))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{blocker}" in one_error(proc)


def test_readiness_reads_the_sqlite_schema(tmp_path: Path) -> None:
    """`SELECT 1` works on any SQLite file; the check reads the node's schema instead."""
    good = Database(f"sqlite:///{tmp_path / 'good.db'}")
    good.upgrade()
    assert database_check(good)() == (True, "sqlite")
    bare = Database(f"sqlite:///{tmp_path / 'bare.db'}")  # no schema: a replaced file
    ok, detail = database_check(bare)()
    assert not ok and "alembic_version" in detail, detail
    broken = tmp_path / "broken.db"
    broken.write_bytes(os.urandom(8192))
    ok, detail = database_check(Database(f"sqlite:///{broken}"))()
    assert not ok and "file is not a database" in detail, detail
    for db in (good, bare):
        db.dispose()


# --------------------------------------------------------------------------- PostgreSQL

PG_CASES = [
    # (id, user, password, database, exit code, cause in the line)
    ("wrong password", "ctmtl_pw", pg_roles.WRONG_PASSWORD, None, 2, "password authentication"),
    ("pg_hba reject", "ctmtl_rejected", None, "postgres", 2, "pg_hba.conf rejects connection"),
    ("missing database", "ctmtl_pw", pg_roles.PASSWORD, "no_such_db", 2, "does not exist"),
    ("too many connections", "ctmtl_full", None, "postgres", 1, "too many connections"),
]


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize(
    ("user", "password", "database", "code", "cause"),
    [c[1:] for c in PG_CASES],
    ids=[c[0] for c in PG_CASES],
)
def test_postgres_start_errors_are_one_line(
    tmp_path: Path,
    tiny_checkpoint: Path,
    pg_auth: AuthPostgres,
    command: str,
    user: str,
    password: str | None,
    database: str | None,
    code: int,
    cause: str,
) -> None:
    url = pg_auth.url(user, password, database or pg_auth.create_database())
    cfg, port = node_toml(tmp_path, tiny_checkpoint)
    proc = run_node(command, "--config", str(cfg), env={"CTMTL_DATABASE__URL": url})
    assert proc.returncode == code, proc.stdout + proc.stderr
    line = one_error(proc)
    assert line.startswith(f"error: database.url: cannot connect to postgresql+psycopg2://{user}")
    assert cause in line, line
    for secret in (pg_roles.PASSWORD, pg_roles.WRONG_PASSWORD):
        assert secret not in proc.stdout + proc.stderr
    assert not port_open(port)


def test_postgres_server_not_reachable_is_exit_1(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Nothing listens on the port: may pass (the server still booting), so systemd's
    Restart=on-failure applies (exit 1, not 2); `config check` only warns."""
    url = f"postgresql+psycopg2://ctmtl_pw:{pg_roles.PASSWORD}@127.0.0.1:{free_port()}/ctmtl"
    cfg, _ = node_toml(tmp_path, tiny_checkpoint)
    env = {"CTMTL_DATABASE__URL": url}
    proc = run_node("serve", "--config", str(cfg), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = one_error(proc)
    assert "cannot connect to" in line and "Connection refused" in line, line
    check = run_node("config", "check", "-q", str(cfg), env=env)
    assert check.returncode == 0, check.stderr
    assert "warning: database.url: cannot connect" in check.stderr
    assert "Connection refused" in check.stderr
    for out in (proc.stdout + proc.stderr, check.stdout + check.stderr):
        assert pg_roles.PASSWORD not in out


def test_config_check_tries_the_postgres_connection(
    tmp_path: Path, tiny_checkpoint: Path, pg_auth: AuthPostgres
) -> None:
    name = pg_auth.create_database()
    cfg, _ = node_toml(tmp_path, tiny_checkpoint)
    good = {"CTMTL_DATABASE__URL": pg_auth.url("ctmtl_pw", pg_roles.PASSWORD, name)}
    proc = run_node("config", "check", str(cfg), env=good)
    assert proc.returncode == 0, proc.stderr
    bad = {"CTMTL_DATABASE__URL": pg_auth.url("ctmtl_pw", pg_roles.WRONG_PASSWORD, name)}
    proc = run_node("config", "check", str(cfg), env=bad)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "database.url: cannot connect" in proc.stderr
    assert "password authentication failed" in proc.stderr
    proc = run_node("config", "check", "--no-connect", "-q", str(cfg), env=bad)
    assert proc.returncode == 0, proc.stderr


def test_readiness_fails_while_postgres_refuses_connections(
    pg_url: str, postgres: ops_fixtures.PostgresServer
) -> None:
    name = pg_url.rsplit("/", 1)[1]
    auth = AuthPostgres(postgres)
    db = Database(pg_url)
    try:
        db.upgrade()
        check = database_check(db)
        assert check() == (True, "postgresql")
        auth.psql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        auth.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        ok, detail = check()
        assert not ok and "not currently accepting connections" in detail, detail
        auth.psql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert check() == (True, "postgresql")
    finally:
        db.dispose()
