"""Metrics and health endpoints: unit behaviour, and a real node counting what it got."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.metrics import NodeMetrics, serving, start_http_server
from dicom_node.service import NodeService
from helpers import wait_for
from ops.conftest import send_files
from ops.synth import write_series


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), float("nan"))


def test_counters_histograms_and_own_registry() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.association_accepted()
    a.association_rejected()
    a.instance_stored(1000)
    a.instance_stored(24)
    a.instance_refused(0xC000)
    a.series_done({"load": 0.2, "inference": 3.0, "total": 9.0, "queue_wait": 1.0})
    a.series_refused()
    a.series_given_up()
    a.observe_stage("send", 0.5)
    a.delivery("pacs", True)
    a.delivery("pacs", False)
    a.set_queue_depth_source(lambda: {("jobs", "queued"): 3, ("deliveries", "pending"): 1})
    text = a.exposition().decode()
    assert value(text, "ctmtl_associations_total", outcome="accepted") == 1
    assert value(text, "ctmtl_associations_total", outcome="rejected") == 1
    assert value(text, "ctmtl_instances_received_total") == 2
    assert value(text, "ctmtl_received_bytes_total") == 1024
    assert value(text, "ctmtl_instances_refused_total", status="0xC000") == 1
    assert value(text, "ctmtl_series_processed_total") == 1
    assert value(text, "ctmtl_series_rejected_total") == 1
    assert value(text, "ctmtl_series_failed_total") == 1
    assert value(text, "ctmtl_stage_seconds_count", stage="inference") == 1
    assert value(text, "ctmtl_stage_seconds_sum", stage="inference") == pytest.approx(3.0)
    assert value(text, "ctmtl_stage_seconds_count", stage="send") == 1
    assert value(text, "ctmtl_stage_seconds_count", stage="lung_mask") == 0  # exported, empty
    assert ("ctmtl_stage_seconds_count", (("stage", "total"),)) not in samples(text)
    assert value(text, "ctmtl_deliveries_total", destination="pacs", outcome="error") == 1
    assert value(text, "ctmtl_queue_depth", queue="jobs", state="queued") == 3
    # b has its own registry: nothing of a's counts
    assert value(b.exposition().decode(), "ctmtl_instances_received_total") == 0


def test_queue_depth_source_failure_does_not_break_scrape() -> None:
    m = NodeMetrics()

    def broken() -> dict[tuple[str, str], float]:
        raise ConnectionError("database down")

    m.set_queue_depth_source(broken)
    text = m.exposition().decode()
    assert "ctmtl_instances_received_total" in text


def test_http_endpoints_liveness_readiness() -> None:
    m = NodeMetrics()
    state = {"db": True}
    m.add_check("database", lambda: (state["db"], "sqlite"))
    m.add_check("model", lambda: (m.is_model_loaded, "model"))
    with serving(m) as srv:
        assert srv.address[0] == "127.0.0.1"
        code, body = get(srv.url + "/healthz")
        assert (code, body) == (200, "ok\n")
        code, body = get(srv.url + "/readyz")
        assert code == 503
        report = json.loads(body)
        assert report["ready"] is False
        assert report["checks"]["model"]["ok"] is False
        assert report["checks"]["database"] == {"ok": True, "detail": "sqlite"}
        m.set_model_loaded(True)
        assert get(srv.url + "/readyz")[0] == 200
        state["db"] = False
        assert get(srv.url + "/readyz")[0] == 503
        m.instance_stored(5)
        code, body = get(srv.url + "/metrics")
        assert code == 200 and value(body, "ctmtl_instances_received_total") == 1
        assert get(srv.url + "/nope")[0] == 404


def test_check_that_raises_counts_as_not_ready() -> None:
    m = NodeMetrics()

    def boom() -> tuple[bool, str]:
        raise OSError("disk gone")

    m.add_check("spool", boom)
    ok, checks = m.readiness()
    assert not ok and "disk gone" in checks["spool"]["detail"]


def test_port_in_use_is_an_error() -> None:
    m = NodeMetrics()
    with serving(m) as srv, pytest.raises(OSError):
        start_http_server(m, "127.0.0.1", srv.port)


@pytest.fixture
def scp_node(make_config: Any, start_node: Callable[..., NodeService]) -> NodeService:
    cfg = make_config(
        allowed_callers=[{"ae_title": "PACS"}],
        selection={"min_slices": 8},
    )
    return start_node(cfg, worker=False, exporter=False)


def test_node_counts_what_was_sent(scp_node: NodeService, tmp_path: Path) -> None:
    srv = scp_node.metrics_server
    assert srv is not None
    code, body = get(srv.url + "/readyz")
    assert code == 200, body
    checks = json.loads(body)["checks"]
    # no worker here: no model check; "faults": database outage or disk full met by the loops
    assert set(checks) == {"database", "spool", "scp", "faults"}

    _, files = write_series(tmp_path / "s1", n_slices=8, size=32)
    _, short = write_series(tmp_path / "s2", n_slices=3, size=32, seed=1)
    assert send_files(scp_node.port, files) == [0] * 8
    assert send_files(scp_node.port, short) == [0] * 3
    assert send_files(scp_node.port, files[:1], calling_ae="INTRUDER") == []  # refused

    spooled = sorted((scp_node.spool.root / "incoming").rglob("*.dcm"))
    assert len(spooled) == 11

    def scraped() -> str:
        return get(srv.url + "/metrics")[1]

    text = scraped()
    assert value(text, "ctmtl_associations_total", outcome="accepted") == 2
    assert value(text, "ctmtl_associations_total", outcome="rejected") == 1
    assert value(text, "ctmtl_instances_received_total") == 11
    assert value(text, "ctmtl_received_bytes_total") == sum(p.stat().st_size for p in spooled)

    # completion: the 8-slice series gets a queued job (no worker here), the 3-slice one
    # is rejected by min_slices; the queue depth comes from the database at scrape time
    wait_for(
        lambda: value(scraped(), "ctmtl_queue_depth", queue="jobs", state="queued") == 1,
        30,
        "a queued job in the metrics",
    )
    wait_for(
        lambda: value(scraped(), "ctmtl_series_rejected_total") == 1, 30, "the rejected series"
    )
    assert value(scraped(), "ctmtl_queue_depth", queue="series", state="receiving") == 0

    # readiness follows the SCP: stopped listener -> 503
    assert scp_node.scp is not None
    scp_node.scp.stop(wait_s=0)
    code, body = get(srv.url + "/readyz")
    assert code == 503 and json.loads(body)["checks"]["scp"]["ok"] is False


def test_worker_without_model_is_not_ready(
    make_config: Any, start_node: Callable[..., NodeService], tmp_path: Path
) -> None:
    def no_model() -> Any:
        raise FileNotFoundError("checkpoint /nowhere.safetensors")

    cfg = make_config()
    service = start_node(cfg, scp=False, worker=True, exporter=False, predictor_factory=no_model)
    assert service.metrics_server is not None
    url = service.metrics_server.url
    assert get(url + "/healthz")[0] == 200
    code, body = get(url + "/readyz")
    assert code == 503
    assert json.loads(body)["checks"]["model"]["detail"] == "model not loaded"
    assert value(get(url + "/metrics")[1], "ctmtl_model_loaded") == 0
