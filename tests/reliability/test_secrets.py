"""Issues 13.12 and 16.1: the database password never reaches stdout, stderr or the log
(the journal, where systemd runs `config check` as ExecStartPre), whether it comes from the
config file or from a `CTMTL_` environment override, on success and on every error path.

Real parts: `ctmtl-node config check | db upgrade | serve | worker` processes against the
real PostgreSQL test cluster with password (SCRAM) authentication; one masking function
(`dicom_node.redact.mask_secrets`) is checked on its own too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ops import conftest as ops_fixtures
from ops.conftest import NodeProcess, base_sections, write_toml

from dicom_node.config import effective_toml, load_config
from dicom_node.redact import MASK, mask_secrets, register_secret
from helpers import free_port, port_open, wait_for
from reliability import pg_roles
from reliability.nodes import run_node
from reliability.pg_roles import PASSWORD, SPECIAL_PASSWORD, WRONG_PASSWORD, AuthPostgres

node_process = ops_fixtures.node_process  # fixtures used here, from their modules
postgres = ops_fixtures.postgres
pg_auth = pg_roles.pg_auth

SECRETS = (PASSWORD, WRONG_PASSWORD, SPECIAL_PASSWORD)


def assert_no_secret(*texts: str) -> None:
    from urllib.parse import quote

    for text in texts:
        for secret in SECRETS:
            for form in {secret, quote(secret, safe="")}:
                assert form not in text, f"{form!r} leaked:\n{text}"


def node_toml(tmp_path: Path, checkpoint: Path, **sections: Any) -> tuple[Path, int]:
    port = free_port()
    ours: dict[str, Any] = {
        "node": {"port": port},
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "precision": "fp32"},
        "metrics": {"enabled": True, "port": free_port()},
        "export": {"enabled": False},
    }
    ours.update(sections)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_toml(tmp_path / "node.toml", base_sections(tmp_path, **ours)), port


# --------------------------------------------------------------------------- the function


def test_mask_secrets_covers_urls_parameters_and_registered_secrets() -> None:
    cases = {
        "postgresql+psycopg2://ctmtl:Pw-1-a@db/ctmtl": "postgresql+psycopg2://ctmtl:***@db/ctmtl",
        # an unescaped '@' in the password: make_url would show its tail as the host
        "postgresql://ctmtl:p@ss-Pw-1-b@db:5432/x": "postgresql://ctmtl:***@db:5432/x",
        "url 'postgresql://u:Pw-1-c@h/d' failed": "url 'postgresql://u:***@h/d' failed",
        "host=db password=Pw-1-d dbname=x": "host=db password=*** dbname=x",
        "postgresql://db/x?password=Pw-1-e&sslmode=require": (
            "postgresql://db/x?password=***&sslmode=require"
        ),
        "sqlite:////var/lib/ctmtl/spool/ctmtl-node.db": "sqlite:////var/lib/ctmtl/spool/ctmtl-node.db",
        'FATAL: password authentication failed for user "ctmtl"': (
            'FATAL: password authentication failed for user "ctmtl"'
        ),
    }
    for text, masked in cases.items():
        assert mask_secrets(text) == masked, text
    register_secret("Reg-Secret/9@")
    assert mask_secrets("driver said: bad value Reg-Secret/9@ here") == (
        f"driver said: bad value {MASK} here"
    )
    assert mask_secrets("escaped Reg-Secret%2F9%40 too") == f"escaped {MASK} too"


def test_effective_config_masks_the_url_and_secret_keys(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://ctmtl_pw:{PASSWORD}@db-host/ctmtl"
    cfg = load_config(None, environ={"CTMTL_DATABASE__URL": url})
    text = effective_toml(cfg)
    assert 'url = "postgresql+psycopg2://ctmtl_pw:***@db-host/ctmtl"' in text
    assert_no_secret(text)


# --------------------------------------------------------------------------- the commands


@pytest.mark.slow
def test_password_from_the_environment_never_appears(
    tmp_path: Path,
    tiny_checkpoint: Path,
    pg_auth: AuthPostgres,
    node_process: Callable[..., NodeProcess],
) -> None:
    name = pg_auth.create_database("ctmtl_sp")
    cfg, port = node_toml(tmp_path, tiny_checkpoint)
    good = {"CTMTL_DATABASE__URL": pg_auth.url("ctmtl_sp", SPECIAL_PASSWORD, name)}

    check = run_node("config", "check", str(cfg), env=good)
    assert check.returncode == 0, check.stderr
    assert f'url = "postgresql+psycopg2://ctmtl_sp:***@127.0.0.1:{pg_auth.port}/{name}"' in (
        check.stdout
    )
    upgrade = run_node("db", "upgrade", "--config", str(cfg), env=good)
    assert upgrade.returncode == 0, upgrade.stderr
    assert f"ctmtl_sp:***@127.0.0.1:{pg_auth.port}/{name}: upgraded from empty" in upgrade.stdout
    assert_no_secret(check.stdout, check.stderr, upgrade.stdout, upgrade.stderr)

    # the node and a worker run with it, logging at DEBUG (SQLAlchemy, alembic, pynetdicom)
    node = node_process("--log-level", "DEBUG", "serve", "--config", str(cfg), env=good)
    wait_for(lambda: port_open(port) or not node.alive(), 120, "the node to listen")
    assert node.alive(), node.log()
    worker = node_process(
        "--log-level",
        "DEBUG",
        "worker",
        "--config",
        str(cfg),
        name="worker",
        env={**good, "CTMTL_METRICS__PORT": str(free_port())},
    )
    wait_for(lambda: "worker" in worker.log() and "started" in worker.log(), 120, "the worker")
    assert worker.alive(), worker.log()
    assert node.stop(30) == 0 and worker.stop(30) == 0
    for proc in (node, worker):
        assert f"database postgresql+psycopg2://ctmtl_sp:***@127.0.0.1:{pg_auth.port}/" in (
            proc.log()
        )
        assert_no_secret(proc.log())


@pytest.mark.parametrize(
    ("where", "host", "password", "code", "cause"),
    [
        ("wrong password", "127.0.0.1", WRONG_PASSWORD, 2, "password authentication failed"),
        ("bad host", "nohost.invalid", PASSWORD, 1, "could not translate host name"),
    ],
    ids=["wrong-password", "bad-host"],
)
def test_password_never_appears_on_error_paths(
    tmp_path: Path,
    tiny_checkpoint: Path,
    pg_auth: AuthPostgres,
    where: str,
    host: str,
    password: str,
    code: int,
    cause: str,
) -> None:
    name = pg_auth.create_database()
    url = pg_auth.url("ctmtl_pw", password, name, host=host)
    # once from the environment, once written into the config file itself
    cfg_env, _ = node_toml(tmp_path / "env", tiny_checkpoint)
    cfg_file, _ = node_toml(tmp_path / "file", tiny_checkpoint, database={"url": url})
    runs = [(cfg_env, {"CTMTL_DATABASE__URL": url}), (cfg_file, {})]
    for cfg, env in runs:
        outputs = []
        for command in (["serve"], ["worker"], ["db", "upgrade"], ["status"]):
            proc = run_node(*command, "--config", str(cfg), env=env)
            assert proc.returncode == code, (where, command, proc.stdout + proc.stderr)
            assert cause in proc.stderr, proc.stderr
            assert "ctmtl_pw:***@" in proc.stderr
            assert "Traceback" not in proc.stderr
            outputs += [proc.stdout, proc.stderr]
        check = run_node("config", "check", str(cfg), env=env)
        assert check.returncode == (2 if code == 2 else 0), check.stdout + check.stderr
        assert cause in check.stderr
        outputs += [check.stdout, check.stderr]
        assert_no_secret(*outputs)
