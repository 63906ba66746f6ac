"""Issue 16.3: a database outage must not flood the log.

A real node process (SCP, completion, worker, exporter) on a real PostgreSQL server of its
own; the server is stopped while the node idles and started again. The node logs one
"database unavailable" line per outage and one "database available again" when it is
back, no tracebacks, backs off in between; /readyz says not ready meanwhile and
`ctmtl_database_outages_total` counts the outages. Afterwards a series goes through."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ops.conftest import NodeProcess, PostgresServer, _pg_bindir, send_files
from ops.synth import write_series

from helpers import port_open, wait_for
from reliability.nodes import (
    lines,
    log_growth,
    metric,
    node_config,
    node_processes,
    ready,
    readyz,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    with node_processes(tmp_path) as start:
        yield start


DOWN = "database unavailable:"
BACK = "database available again"


class RestartablePostgres(PostgresServer):
    """The test cluster, with stop and start that keep its data (an outage, not a loss)."""

    def halt(self) -> None:
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def resume(self) -> None:
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
             "-t", "60", "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
             "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
             "-c max_connections=200", "start"]
        )  # fmt: skip


@pytest.fixture
def own_postgres() -> Iterator[RestartablePostgres]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (apt install postgresql)")
    pytest.importorskip("psycopg2")
    server = RestartablePostgres(bindir)
    try:
        yield server
    finally:
        server.stop()


def _outage(node: Any, url: str, pg: RestartablePostgres, n: int) -> None:
    """Stop the server, check the node stays quiet and not ready, start it again."""
    pg.halt()
    wait_for(lambda: len(lines(node.log(), DOWN)) == n, 30, f"outage {n} to be noticed")
    quiet = log_growth(node.log, 4.0)  # was ~775 lines/s of psycopg2 tracebacks
    assert len(quiet) <= 2, quiet
    code, body = readyz(url)
    checks = json.loads(body)["checks"]
    assert code == 503 and not checks["database"]["ok"], body
    assert not checks["faults"]["ok"] and "database unavailable" in checks["faults"]["detail"]
    assert metric(url, "ctmtl_database_outages_total") == n
    assert metric(url, "ctmtl_fault_active", fault="database") == 1
    pg.resume()
    wait_for(lambda: len(lines(node.log(), BACK)) == n, 30, f"the end of outage {n}")
    wait_for(lambda: readyz(url)[0] == 200, 30, "ready again")
    assert metric(url, "ctmtl_fault_active", fault="database") == 0


def test_outage_logs_one_line_each_way_and_the_node_recovers(
    own_postgres: RestartablePostgres,
    node_process: Callable[..., Any],
    storescp: Callable[..., Any],
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    pacs = storescp("pacs", "PACS")
    cfg, port, url = node_config(
        tmp_path,
        tiny_checkpoint,
        database={"url": own_postgres.create_database("outage")},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        routing={"default": ["pacs"]},
    )
    node = node_process("serve", "--config", str(cfg))
    wait_for(lambda: port_open(port) and ready(url), 120, "the node ready")

    _outage(node, url, own_postgres, 1)
    _outage(node, url, own_postgres, 2)  # each outage is one line and one count
    log = node.log()
    assert len(lines(log, DOWN)) == 2 and len(lines(log, BACK)) == 2
    assert "Traceback" not in log, log[-3000:]

    # every loop works again: received, completed, processed and sent
    _, files = write_series(tmp_path / "in", n_slices=8, size=64)
    assert send_files(port, files, "MODALITY") == [0] * 8
    wait_for(lambda: len(pacs.files()) == 2, 120, "SEG and SR at the PACS")
    assert "Traceback" not in node.log()
