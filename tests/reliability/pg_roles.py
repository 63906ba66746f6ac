"""Roles with real authentication on the test PostgreSQL cluster (tests/ops/conftest.py).

The cluster trusts every local connection; for the start-up and secrets tests some roles
get rules of their own, put in front of the trust lines of its `pg_hba.conf`:

- `ctmtl_pw` logs in with a password (SCRAM), `PASSWORD`; `ctmtl_sp` with
  `SPECIAL_PASSWORD`, which needs escaping in a URL;
- `ctmtl_rejected` is refused by a `reject` line;
- `ctmtl_full` has `CONNECTION LIMIT 0` ("too many connections for role").

Other roles (the `ctmtl` superuser of the other tests) keep their trust rules.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from ops.conftest import PostgresServer

#: The password the tests look for in every output: it must never appear.
PASSWORD = "Pw-7f3a-Secr3t-91"
#: A wrong password, equally secret.
WRONG_PASSWORD = "Wr0ng-Pw-c41d-77"
#: A password with characters a URL must escape (`%40` for `@` ...).
SPECIAL_PASSWORD = "Sp3c@l/p:w%d#x"

_MARK = "# ctmtl reliability tests: roles with authentication"
_RULES = f"""{_MARK}
host all ctmtl_rejected 127.0.0.1/32 reject
host all ctmtl_pw 127.0.0.1/32 scram-sha-256
host all ctmtl_sp 127.0.0.1/32 scram-sha-256
"""


class AuthPostgres:
    """The session's server with the roles above."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.port = server.port
        self._n = 0

    def psql(self, sql: str, database: str = "postgres") -> None:
        s = self.server
        s._run(
            [str(s.bindir / "psql"), "-h", "127.0.0.1", "-p", str(s.port), "-U", "ctmtl",
             "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql]
        )  # fmt: skip

    def url(self, user: str, password: str | None, database: str, host: str = "127.0.0.1") -> str:
        auth = user if password is None else f"{user}:{quote(password, safe='')}"
        return f"postgresql+psycopg2://{auth}@{host}:{self.port}/{database}"

    def create_database(self, owner: str = "ctmtl_pw") -> str:
        """A new database owned by `owner`; its name."""
        self._n += 1
        name = f"auth_{os.getpid()}_{int(time.time() * 1000) % 100000}_{self._n}"
        self.psql(f'CREATE DATABASE "{name}" OWNER {owner}')
        return name


def _role(name: str, options: str) -> str:
    return (
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN "
        f"CREATE ROLE {name} {options}; END IF; END $$"
    )


def _wait_rules_active(port: int) -> None:
    """pg_reload_conf() only signals the server: wait until the reject rule applies."""
    import psycopg2

    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg2.connect(
                host="127.0.0.1", port=port, user="ctmtl_rejected", dbname="postgres"
            ).close()
        except psycopg2.OperationalError as exc:
            if "pg_hba.conf rejects" in str(exc):
                return
        if time.monotonic() > deadline:
            pytest.fail("pg_hba.conf rules for the test roles did not become active")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def pg_auth(postgres: PostgresServer) -> Iterator[AuthPostgres]:
    auth = AuthPostgres(postgres)
    auth.psql(_role("ctmtl_pw", f"LOGIN PASSWORD '{PASSWORD}'"))
    auth.psql(_role("ctmtl_sp", f"LOGIN PASSWORD '{SPECIAL_PASSWORD}'"))
    auth.psql(_role("ctmtl_rejected", "LOGIN"))
    auth.psql(_role("ctmtl_full", "LOGIN CONNECTION LIMIT 0"))
    hba = postgres.data / "pg_hba.conf"
    original = hba.read_text()
    if _MARK not in original:
        hba.write_text(_RULES + original)  # first match wins: in front of the trust lines
    auth.psql("SELECT pg_reload_conf()")
    _wait_rules_active(postgres.port)
    try:
        yield auth
    finally:
        if _MARK not in original and hba.exists():
            hba.write_text(original)
            with contextlib.suppress(RuntimeError):  # the server may be gone already
                auth.psql("SELECT pg_reload_conf()")
