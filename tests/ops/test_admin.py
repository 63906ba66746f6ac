"""Admin CLI against a running node (in-process, SQLite, tiny model, storescp as PACS):
status, destinations, resend, retry, purge; and the metrics of a processed series."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.admin import parse_duration
from dicom_node.cli import main
from dicom_node.db import Job, JobState, Result
from dicom_node.service import NodeService
from helpers import wait_for
from ops.conftest import base_sections, send_files, write_toml
from ops.synth import write_series
from ops.test_metrics import get, value

pytestmark = pytest.mark.slow


@pytest.fixture
def running(
    tmp_path: Path, tiny_checkpoint: Path, storescp: Any, start_node: Callable[..., NodeService]
) -> tuple[NodeService, Path, Any]:
    pacs = storescp("pacs", "PACS")
    data = base_sections(tmp_path, model={"checkpoint": str(tiny_checkpoint), "device": "cpu"})
    data["allowed_callers"] = [{"ae_title": "MODALITY"}]
    data["destinations"] = [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    ]
    data["routing"] = {"default": ["pacs"]}
    cfg_path = write_toml(tmp_path / "node.toml", data)
    from dicom_node.config import load_config

    service = start_node(load_config(cfg_path, environ={}), config_path=cfg_path)
    return service, cfg_path, pacs


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_parse_duration() -> None:
    assert parse_duration("7d").days == 7
    assert parse_duration("12h").total_seconds() == 12 * 3600
    assert parse_duration("30m").total_seconds() == 1800
    assert parse_duration("2").days == 2
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_admin_commands_on_a_running_node(
    running: tuple[NodeService, Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service, cfg, pacs = running
    conf = ["--config", str(cfg)]
    uid, files = write_series(tmp_path / "in", n_slices=8, size=64)
    assert send_files(service.port, files, "MODALITY") == [0] * 8
    wait_for(lambda: len(pacs.files()) == 2, 120, "SEG + SR at the PACS")
    first = {str(pydicom.dcmread(p).SOPInstanceUID) for p in pacs.files()}

    # metrics of one processed series: every stage timed once
    assert service.metrics_server is not None
    url = service.metrics_server.url
    wait_for(  # the PACS has the files a moment before the exporter records the delivery
        lambda: value(get(url + "/metrics")[1], "ctmtl_deliveries_total", destination="pacs",
                      outcome="ok") == 1,
        30,
        "the delivery to be recorded",
    )  # fmt: skip
    text = get(url + "/metrics")[1]
    assert value(text, "ctmtl_series_processed_total") == 1
    for stage in ("load", "lung_mask", "inference", "seg", "sr", "send"):
        assert value(text, "ctmtl_stage_seconds_count", stage=stage) == 1, stage
    assert value(text, "ctmtl_deliveries_total", destination="pacs", outcome="ok") == 1
    assert value(text, "ctmtl_model_loaded") == 1
    assert get(service.metrics_server.url + "/readyz")[0] == 200

    code, out, _ = cli(capsys, "status", "--json", "--state", "done", *conf)
    assert code == 0
    rows = json.loads(out)
    assert [r["series_instance_uid"] for r in rows] == [uid]
    job_id = rows[0]["jobs"][0]["id"]
    assert rows[0]["jobs"][0]["deliveries"][0]["state"] == "done"
    assert json.loads(cli(capsys, "status", "--json", "--state", "failed", *conf)[1]) == []

    code, out, _ = cli(capsys, "destinations", *conf)
    assert code == 0 and "pacs" in out and f"PACS@127.0.0.1:{pacs.port}" in out
    assert "routed: default" in out

    # resend: the same objects go out again
    code, out, _ = cli(capsys, "resend", uid, *conf)
    assert code == 0 and out.startswith("pacs: queued")
    wait_for(lambda: len(pacs.files()) == 4, 60, "the resent objects")
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in pacs.files()} == first
    code, _, err = cli(capsys, "resend", uid, "--to", "nowhere", *conf)
    assert code == 1 and "no destination named 'nowhere'" in err
    code, _, err = cli(capsys, "resend", "1.2.3.4.5", *conf)
    assert code == 1 and "no series 1.2.3.4.5" in err

    # retry: a new job, new results replace the old ones at the PACS
    code, out, _ = cli(capsys, "retry", str(job_id), *conf)
    assert code == 0 and f"(retry of job {job_id})" in out
    wait_for(lambda: len(pacs.files()) == 6, 120, "the results of the retried job")
    with service.db.session() as s:
        jobs = s.query(Job).order_by(Job.id).all()
        assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE]
        results = s.query(Result).order_by(Result.id).all()
        assert [r.superseded for r in results] == [True, False]
    code, _, err = cli(capsys, "retry", "9999", *conf)
    assert code == 1 and "no job 9999" in err

    # purge: spooled files go, rows stay; retry/resend then say why they cannot
    code, out, _ = cli(capsys, "purge", "--older-than", "0s", *conf)
    assert code == 0 and "1 finished series" in out
    assert not list((service.spool.root / "incoming").rglob("*.dcm"))
    code, _, err = cli(capsys, "retry", str(job_id), *conf)
    assert code == 1 and "purged" in err
    code, _, err = cli(capsys, "resend", uid, *conf)
    assert code == 1 and "purged" in err
    code, _, err = cli(capsys, "purge", "--older-than", "soon", *conf)
    assert code == 2 and "not a duration" in err
