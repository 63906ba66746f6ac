"""DICOMweb destinations against the real Orthanc DICOMweb plugin (Debian orthanc-dicomweb).

Orthanc runs from a config in a temp folder on a free loopback port, with only the
DICOMweb plugin, its DICOM port off and HTTP basic authentication (`RegisteredUsers`).
The node's exporter sends the SEG + SR of the real 30-slice series by STOW-RS; the tests
read back from Orthanc what it stored, and what the node recorded and shows.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from ops.certs import CertPair, make_ca
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.cli import main
from dicom_node.config import ConfigError, DicomWebDestination, StartupError, load_config
from dicom_node.db import Database, Delivery, DeliveryState, Result
from dicom_node.export import Exporter, retry_when_answering
from dicom_node.service import NodeService
from helpers import (
    StoreSCP,
    add_done_result,
    free_port,
    orthanc_answers,
    port_open,
    stop_process,
    wait_for,
)

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, SECRET = "ctmtl", "stow-Secret-7f3a9c"


class OrthancWeb:
    """Orthanc with the DICOMweb plugin only (no DICOM port), basic auth, on 127.0.0.1.

    `stop()` and `start()` again keep the port and the storage: the same archive, down
    for a while.
    """

    def __init__(self, folder: Path) -> None:
        if not ORTHANC.exists() or not PLUGIN.exists():
            pytest.skip(
                "Orthanc or its DICOMweb plugin not installed (apt install orthanc-dicomweb)"
            )
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.config: dict[str, Any] = {
            "Name": "ctmtl-test-dicomweb",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: SECRET},
            "DicomServerEnabled": False,
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpThreadsCount": 4,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        #: how the test itself reads from Orthanc
        self.authorization = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def start(self, **settings: Any) -> OrthancWeb:
        """Start with these settings over the defaults (e.g. MaximumStorageSize)."""
        config = {**self.config, **settings}
        (self.folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        with (self.folder / "orthanc.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(ORTHANC), str(self.folder / "orthanc.json")], stdout=log, stderr=log
            )
        wait_for(self._up, 30, "Orthanc DICOMweb")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        return orthanc_answers(self.proc, self.get)

    def get(self, path: str) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        req.add_header("Authorization", self.authorization)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def sop_instance_uids(self) -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, 20)  # waits for the pid: Orthanc's SQLite lock is free


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancWeb]:
    server = OrthancWeb(tmp_path / "orthanc")
    yield server
    server.stop()


def _secret_file(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "stow.secret"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def _config(tmp_path: Path, destinations: str, **export: Any) -> Path:
    """A node TOML with these `[[destinations]]` tables, all routed; short export timings."""
    settings = {"poll_interval_s": 0.2, "initial_backoff_s": 0.2, "max_backoff_s": 0.5}
    settings.update(export)
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    text = (
        f'[spool]\npath = "{tmp_path / "spool"}"\nmin_free_mb = 0\n\n'
        f"[export]\n{lines}\n\n{destinations}\n"
    )
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def _web(url: str, secret_file: Path, extra: str = "") -> str:
    return (
        f'[[destinations]]\nname = "web"\nkind = "dicomweb"\nurl = "{url}"\ntimeout_s = 10\n'
        f"{extra}"
        f'[destinations.auth]\ntype = "basic"\nusername = "{USER}"\n'
        f'secret_file = "{secret_file}"\n'
    )


def _deliveries(db: Database) -> dict[str, Delivery]:
    with db.session() as s:
        return {d.destination: d for d in s.scalars(select(Delivery))}


def _setup(cfg_path: Path, result: Any, extras: Sequence[Path] = ()) -> tuple[Exporter, Database]:
    """An exporter for the config, and its database with the result queued to every
    destination (as the worker leaves it)."""
    cfg = load_config(cfg_path, environ={})
    db = Database(cfg.database_url)
    result_id = add_done_result(db, cfg.destinations, result.seg_path, result.sr_path)
    if extras:
        with db.session() as s:
            row = s.get(Result, result_id)
            assert row is not None
            row.extra_paths = [str(p) for p in extras]
    return Exporter(cfg, db), db


def _uids(result: Any) -> set[str]:
    """The SOP Instance UIDs of the node's SEG and SR."""
    return {result.seg_sop_instance_uid, result.sr_sop_instance_uid}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.slow
def test_stow_rs_stores_seg_and_sr_in_orthanc(
    orthanc: OrthancWeb,
    pipeline_result: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    orthanc.start()
    cfg_path = _config(tmp_path, _web(orthanc.url, _secret_file(tmp_path, SECRET)))
    exporter, db = _setup(cfg_path, pipeline_result)
    try:
        assert exporter.run_once() == 1
    finally:
        exporter.close()
    d = _deliveries(db)["web"]
    assert d.state == DeliveryState.DONE, d.last_error
    assert (d.attempts, d.host, d.port) == (1, "127.0.0.1", orthanc.port)

    # Orthanc holds exactly the node's objects, with their UIDs
    seg = pydicom.dcmread(pipeline_result.seg_path, stop_before_pixels=True)
    stored = orthanc.get("/instances?expand")
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in stored} == _uids(pipeline_result)
    [study] = orthanc.get("/studies?expand")
    assert study["MainDicomTags"]["StudyInstanceUID"] == seg.StudyInstanceUID
    series = {s["MainDicomTags"]["Modality"]: s for s in orthanc.get("/series?expand")}
    assert series["SEG"]["MainDicomTags"]["SeriesInstanceUID"] == seg.SeriesInstanceUID

    # echo checks it by QIDO-RS with the same credentials; `destinations --echo` too
    code, out = _cli(capsys, "echo", "web", "--config", str(cfg_path))
    assert code == 0 and f"QIDO-RS {orthanc.url}/studies?limit=1: HTTP 200" in out, out
    code, out = _cli(capsys, "destinations", "--echo", "--config", str(cfg_path))
    assert code == 0 and orthanc.url in out and "ok: QIDO-RS" in out, out
    assert SECRET not in caplog.text and SECRET not in out


@pytest.mark.slow
def test_wrong_secret_fails_once_with_401_and_is_sent_once_it_is_fixed(
    orthanc: OrthancWeb,
    pipeline_result: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    orthanc.start()
    wrong = "not-the-Secret-1234"
    secret_file = _secret_file(tmp_path, wrong)
    cfg_path = _config(tmp_path, _web(orthanc.url, secret_file), max_attempts=5)
    exporter, db = _setup(cfg_path, pipeline_result)
    try:
        assert exporter.run_once() == 1
        d = _deliveries(db)["web"]
        # failed for good at the first attempt: no retry storm against the archive
        assert (d.state, d.attempts) == (DeliveryState.FAILED, 1)
        error = d.last_error or ""
        assert "HTTP 401" in error and "refused the node's basic credentials" in error
        assert f"user '{USER}'" in error and str(secret_file) in error
        time.sleep(0.6)  # past any backoff: nothing is due
        assert exporter.run_once() == 0
        assert orthanc.sop_instance_uids() == set()

        # the re-check asks QIDO-RS with the same wrong secret: refused, nothing queued
        code, out = _cli(capsys, "echo", "web", "--config", str(cfg_path))
        assert code == 1 and "HTTP 401" in out, out
        assert exporter.recheck_failed(force=True) == 1
        exporter.wait(timeout=30)
        assert _deliveries(db)["web"].state == DeliveryState.FAILED

        # the secret is read at each request: fixing the file is enough
        secret_file.write_text(SECRET + "\n")
        assert exporter.recheck_failed(force=True) == 1
        exporter.wait(timeout=30)
        assert _deliveries(db)["web"].state == DeliveryState.PENDING
        assert "answers QIDO-RS again" in caplog.text
        assert exporter.run_once() == 1
    finally:
        exporter.close()
    assert _deliveries(db)["web"].state == DeliveryState.DONE
    assert orthanc.sop_instance_uids() == _uids(pipeline_result)
    for text in (caplog.text, out):
        assert SECRET not in text and wrong not in text


@pytest.mark.slow
def test_bearer_token_from_the_environment(
    orthanc: OrthancWeb,
    pipeline_result: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Orthanc checks `Authorization: Bearer <token>` in a Lua request filter (it answers
    403 otherwise): the token from `secret_env` gets the results in; another is refused
    once, with the variable named and the token in no log line."""
    caplog.set_level(logging.DEBUG)
    token = "bearer-tok-5c1e9a77"
    lua = tmp_path / "bearer.lua"
    lua.write_text(
        "function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n"
        f'  return headers["authorization"] == "Bearer {token}"\n'
        "end\n"
    )
    orthanc.authorization = f"Bearer {token}"
    orthanc.start(AuthenticationEnabled=False, LuaScripts=[str(lua)])
    dest = (
        f'[[destinations]]\nname = "web"\nkind = "dicomweb"\nurl = "{orthanc.url}"\n'
        '[destinations.auth]\ntype = "bearer"\nsecret_env = "CTMTL_TEST_STOW_TOKEN"\n'
    )
    cfg_path = _config(tmp_path, dest)
    monkeypatch.setenv("CTMTL_TEST_STOW_TOKEN", "wrong-tok-0000")
    exporter, db = _setup(cfg_path, pipeline_result)
    try:
        assert exporter.run_once() == 1
        d = _deliveries(db)["web"]
        assert (d.state, d.attempts) == (DeliveryState.FAILED, 1)
        assert "HTTP 403" in (d.last_error or "") and "refused the node's bearer credentials" in (
            d.last_error or ""
        )
        assert "environment variable CTMTL_TEST_STOW_TOKEN" in (d.last_error or "")
        monkeypatch.setenv("CTMTL_TEST_STOW_TOKEN", token)
        assert exporter.recheck_failed(force=True) == 1
        exporter.wait(timeout=30)
        assert exporter.run_once() == 1
    finally:
        exporter.close()
    assert _deliveries(db)["web"].state == DeliveryState.DONE
    assert orthanc.sop_instance_uids() == _uids(pipeline_result)
    assert token not in caplog.text and "wrong-tok-0000" not in caplog.text


@pytest.mark.slow
def test_orthanc_down_is_retried_and_delivered_when_it_is_back(
    orthanc: OrthancWeb, pipeline_result: Any, tmp_path: Path
) -> None:
    cfg_path = _config(tmp_path, _web(orthanc.url, _secret_file(tmp_path, SECRET)))
    exporter, db = _setup(cfg_path, pipeline_result)
    try:
        t0 = time.monotonic()
        assert exporter.run_once() == 1  # nothing listens on the port yet
        assert time.monotonic() - t0 < 5  # one request per attempt, no retries inside it
        d = _deliveries(db)["web"]
        assert (d.state, d.attempts) == (DeliveryState.PENDING, 1)
        assert f"connection refused (127.0.0.1:{orthanc.port})" in (d.last_error or "")
        orthanc.start()
        wait_for(lambda: exporter.run_once() == 1, 10, "the retry to be due", step=0.1)
    finally:
        exporter.close()
    d = _deliveries(db)["web"]
    assert (d.state, d.attempts, d.last_error) == (DeliveryState.DONE, 2, None)
    assert pipeline_result.seg_sop_instance_uid in orthanc.sop_instance_uids()


@pytest.mark.slow
def test_object_the_archive_refuses_is_recorded_shown_and_not_retried(
    orthanc: OrthancWeb,
    pipeline_result: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Orthanc answers 400 with a FailedSOPSequence (0xC000) for an object without a Study
    Instance UID and stores the others: a partial failure that no retry can fix."""
    orthanc.start()
    broken = pydicom.dcmread(pipeline_result.sr_path)
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del broken.StudyInstanceUID
    broken_path = tmp_path / "broken.dcm"
    broken.save_as(broken_path)
    cfg_path = _config(
        tmp_path, _web(orthanc.url, _secret_file(tmp_path, SECRET)), recheck_failed_s=0.2
    )
    exporter, db = _setup(cfg_path, pipeline_result, extras=[broken_path])
    try:
        assert exporter.run_once() == 1
        d = _deliveries(db)["web"]
        assert (d.state, d.attempts) == (DeliveryState.FAILED, 1)
        error = d.last_error or ""
        assert error.startswith(f"STOW-RS refused by {orthanc.url}: HTTP 400"), error
        assert f"1 of 3 object(s) not stored: broken.dcm (SR {broken.SOPInstanceUID})" in error
        assert "0xC000 cannot understand" in error
        assert not retry_when_answering(error)
        # the archive answers, but the re-check does not send a refused delivery again
        assert exporter.recheck_failed(force=True) == 1
        exporter.wait(timeout=30)
        assert _deliveries(db)["web"].state == DeliveryState.FAILED
    finally:
        exporter.close()
    # the others were stored; the reason is where an administrator looks
    assert orthanc.sop_instance_uids() == _uids(pipeline_result)
    code, out = _cli(capsys, "status", "--config", str(cfg_path))
    assert code == 0 and "[delivery failed: web]" in out
    assert "-> web          failed    1x  STOW-RS refused" in out and "0xC000" in out, out
    code, out = _cli(capsys, "status", "--json", "--config", str(cfg_path))
    [delivery] = json.loads(out)[0]["jobs"][0]["deliveries"]
    assert delivery["state"] == "failed" and broken.SOPInstanceUID in delivery["error"]


@pytest.mark.slow
def test_full_archive_answering_200_without_the_objects_is_retried_until_there_is_room(
    orthanc: OrthancWeb, pipeline_result: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Orthanc with a 1 MB storage limit cannot store the 2 MB SEG; its plugin answers
    200 OK and leaves the objects out of both sequences. The node records them as not
    stored, retries, and delivers once the archive has room (restarted without the limit)."""
    assert pipeline_result.seg_path.stat().st_size > 1024 * 1024
    orthanc.start(MaximumStorageSize=1)
    cfg_path = _config(
        tmp_path, _web(orthanc.url, _secret_file(tmp_path, SECRET)), initial_backoff_s=1.0
    )
    exporter, db = _setup(cfg_path, pipeline_result)
    try:
        assert exporter.run_once() == 1
        d = _deliveries(db)["web"]
        assert (d.state, d.attempts) == (DeliveryState.PENDING, 1)
        error = d.last_error or ""
        assert error.startswith(f"STOW-RS to {orthanc.url}: HTTP 200 OK: "), error
        seg = pipeline_result.seg_sop_instance_uid
        assert f"SEG {seg}: not acknowledged" in error, error
        assert seg not in orthanc.sop_instance_uids()
        _, out = _cli(capsys, "status", "--config", str(cfg_path))
        assert "-> web          pending   1x  STOW-RS to" in out and "not acknowledged" in out

        orthanc.stop()
        orthanc.start()  # the same archive, now without the limit
        wait_for(lambda: exporter.run_once() == 1, 10, "the retry to be due", step=0.2)
    finally:
        exporter.close()
    d = _deliveries(db)["web"]
    assert (d.state, d.attempts) == (DeliveryState.DONE, 2), d.last_error
    assert orthanc.sop_instance_uids() == _uids(pipeline_result)


@pytest.mark.slow
def test_a_url_that_is_not_the_dicomweb_root_is_named_and_not_retried(
    orthanc: OrthancWeb, pipeline_result: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The url of Orthanc itself instead of its /dicom-web: its own REST API refuses the
    QIDO-RS search and the STOW-RS POST; the delivery fails at once naming the url."""
    orthanc.start()
    root = orthanc.url.removesuffix("/dicom-web")
    cfg_path = _config(tmp_path, _web(root, _secret_file(tmp_path, SECRET)))
    code, out = _cli(capsys, "echo", "web", "--config", str(cfg_path))
    assert code == 1 and f"QIDO-RS {root}/studies?limit=1: HTTP 400" in out, out
    exporter, db = _setup(cfg_path, pipeline_result)
    try:
        assert exporter.run_once() == 1
    finally:
        exporter.close()
    d = _deliveries(db)["web"]
    assert (d.state, d.attempts) == (DeliveryState.FAILED, 1)
    assert f"no DICOMweb service at {root}" in (d.last_error or ""), d.last_error
    assert orthanc.sop_instance_uids() == set()


@pytest.mark.slow
def test_a_hung_dicomweb_destination_blocks_no_cstore_destination(
    storescp: Callable[..., StoreSCP],
    silent_peer: int,
    pipeline_result: Any,
    tmp_path: Path,
) -> None:
    pacs = storescp("pacs", "PACS")
    dests = (
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {pacs.port}\n\n"
        f'[[destinations]]\nname = "web"\nkind = "dicomweb"\n'
        f'url = "http://127.0.0.1:{silent_peer}/dicom-web"\ntimeout_s = 3\n'
    )
    exporter, db = _setup(_config(tmp_path, dests), pipeline_result)
    try:
        t0 = time.monotonic()
        assert exporter.dispatch() == 2
        wait_for(
            lambda: _deliveries(db)["pacs"].state == DeliveryState.DONE, 2.5, "C-STORE delivery"
        )
        assert time.monotonic() - t0 < 3.0
        assert _deliveries(db)["web"].state == DeliveryState.SENDING  # still waiting
        exporter.wait(timeout=30)
    finally:
        exporter.close()
    web = _deliveries(db)["web"]
    assert (web.state, web.attempts) == (DeliveryState.PENDING, 1)
    assert f"no answer within 3 s (127.0.0.1:{silent_peer})" in (web.last_error or "")
    assert {pydicom.dcmread(f).SOPInstanceUID for f in pacs.files()} == _uids(pipeline_result)


@pytest.fixture
def https_front(orthanc: OrthancWeb, tmp_path: Path) -> Iterator[Callable[[CertPair], str]]:
    """HTTPS in front of Orthanc (socat with OpenSSL; Debian's Orthanc 1.10 crashes on
    its own HTTPS with OpenSSL 3): returns the DICOMweb base URL over TLS."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat not installed (apt install socat)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(pair: CertPair) -> str:
        pem = tmp_path / "front.pem"
        pem.write_text(pair.cert.read_text() + pair.key.read_text())
        port = free_port()
        listen = f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={pem},verify=0"
        procs.append(
            subprocess.Popen(
                [socat, listen, f"TCP:127.0.0.1:{orthanc.port}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_for(lambda: port_open(port), 10, "socat TLS front")
        return f"https://127.0.0.1:{port}/dicom-web"

    yield start
    for proc in procs:
        stop_process(proc, 5)


@pytest.mark.slow
def test_tls_is_verified_against_the_ca_file(
    orthanc: OrthancWeb,
    https_front: Callable[[CertPair], str],
    pipeline_result: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS: a server certificate the node cannot verify fails the delivery at once with a
    TLS reason; after a reload with the right `ca_file` the re-check sends it. A CA bundle
    in the environment (requests reads REQUESTS_CA_BUNDLE) does not replace `ca_file`."""
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())  # public CAs only
    site, rogue = make_ca(tmp_path / "site"), make_ca(tmp_path / "rogue", cn="rogue CA")
    orthanc.start()
    url = https_front(site.issue("orthanc", "localhost", server=True))
    secret = _secret_file(tmp_path, SECRET)
    cfg_path = _config(tmp_path, _web(url, secret, f'ca_file = "{rogue.ca_cert}"\n'))
    exporter, db = _setup(cfg_path, pipeline_result)
    try:
        assert exporter.run_once() == 1
        d = _deliveries(db)["web"]
        assert (d.state, d.attempts) == (DeliveryState.FAILED, 1)
        assert "TLS: certificate verify failed" in (d.last_error or ""), d.last_error
        code, out = _cli(capsys, "echo", "web", "--config", str(cfg_path))
        assert code == 1 and "TLS: certificate verify failed" in out, out
        assert orthanc.sop_instance_uids() == set()
        # the reload (SIGHUP) with the site CA: the re-check runs at once and sends it
        cfg_path.write_text(cfg_path.read_text().replace(str(rogue.ca_cert), str(site.ca_cert)))
        exporter.config = load_config(cfg_path, environ={})
        assert exporter.recheck_failed() == 1
        exporter.wait(timeout=30)
        assert exporter.run_once() == 1
    finally:
        exporter.close()
    assert _deliveries(db)["web"].state == DeliveryState.DONE
    assert pipeline_result.sr_sop_instance_uid in orthanc.sop_instance_uids()
    code, out = _cli(capsys, "echo", "web", "--config", str(cfg_path))
    assert code == 0 and f"QIDO-RS {url}/studies?limit=1: HTTP 200" in out, out


# --------------------------------------------------------------------------- config


def _check(tmp_path: Path, capsys: pytest.CaptureFixture[str], dest: str) -> tuple[int, str]:
    path = _config(tmp_path, dest)
    return _cli(capsys, "config", "check", str(path), "--no-connect")


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ('url = "ftp://pacs/dicom-web"', "destinations.0.url", "must start with https://"),
        ('url = "https:///dicom-web"', "destinations.0.url", "names no host"),
        ('url = "https://u:pw@pacs/dicom-web"', "destinations.0.url", "must not hold credentials"),
        ('url = "https://pacs/dicom-web?x=1"', "destinations.0.url", "without ? or #"),
        ('url = "https://pacs/dw"\nae_title = "PACS"', "destinations.0.ae_title", "Extra inputs"),
        ('url = "http://pacs/dw"\nca_file = "ca.pem"', "destinations.0", "ca_file is for https"),
        (
            'url = "https://pacs/dw"\n[destinations.auth]\ntype = "basic"\nusername = "u"\n'
            'password = "hunter22"',
            "destinations.0.auth",
            "secrets are not read from the config file",
        ),
        (
            'url = "https://pacs/dw"\n[destinations.auth]\ntype = "basic"\nsecret_env = "X"',
            "destinations.0.auth",
            "needs a username",
        ),
        (
            'url = "https://pacs/dw"\n[destinations.auth]\ntype = "bearer"',
            "destinations.0.auth",
            "exactly one of secret_file or secret_env",
        ),
        (
            'url = "https://pacs/dw"\n[destinations.auth]\ntype = "digest"\nsecret_env = "X"',
            "destinations.0.auth.type",
            "'basic' or 'bearer'",
        ),
    ],
)
def test_config_check_names_each_dicomweb_mistake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, key: str, message: str
) -> None:
    dest = f'[[destinations]]\nname = "web"\nkind = "dicomweb"\n{table}\n'
    code, out = _check(tmp_path, capsys, dest)
    assert code == 2, out
    assert f"  {key}" in out and message in out, out
    assert "hunter22" not in out
    with pytest.raises(ConfigError):
        load_config(tmp_path / "node.toml", environ={})


def test_config_check_reads_the_secret_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = '[[destinations]]\nname = "web"\nkind = "dicomweb"\nurl = "http://archive.example/dw"\n'
    missing = tmp_path / "nope.secret"
    code, out = _check(
        tmp_path,
        capsys,
        base + f'[destinations.auth]\ntype = "basic"\nusername = "u"\nsecret_file = "{missing}"',
    )
    assert code == 2 and f"destinations.0.auth: web: auth.secret_file {missing}" in out, out
    monkeypatch.delenv("CTMTL_TEST_TOKEN", raising=False)
    bearer = base + '[destinations.auth]\ntype = "bearer"\nsecret_env = "CTMTL_TEST_TOKEN"'
    code, out = _check(tmp_path, capsys, bearer)
    assert code == 2 and "environment variable CTMTL_TEST_TOKEN is unset" in out, out

    token = "tok-4f9d2a7be81c"
    monkeypatch.setenv("CTMTL_TEST_TOKEN", token)
    code, out = _check(tmp_path, capsys, bearer)
    assert code == 0, out
    assert 'kind = "dicomweb"' in out and 'secret_env = "CTMTL_TEST_TOKEN"' in out
    assert "bearer credentials go over plain http to archive.example" in out  # a warning
    assert token not in out

    secret = tmp_path / "shared.secret"
    secret.write_text("pw-1234567\n")
    secret.chmod(0o644)
    code, out = _check(
        tmp_path,
        capsys,
        base.replace("http://", "https://")
        + f'[destinations.auth]\ntype = "basic"\nusername = "u"\nsecret_file = "{secret}"',
    )
    assert code == 0 and f"{secret} is readable by other users" in out, out
    assert f'secret_file = "{secret}"' in out and "pw-1234567" not in out
    cfg = load_config(tmp_path / "node.toml", environ={})
    assert isinstance(cfg.destinations[0], DicomWebDestination)


def test_the_node_does_not_start_without_a_destinations_secret(
    make_config: Callable[..., Any], tmp_path: Path
) -> None:
    """A node whose exporter could not authenticate must not accept series: refused at
    start with the key and the file named (exit 2: only a fix of the config helps)."""
    missing = tmp_path / "archive.secret"
    cfg = make_config(
        destinations=[
            {
                "name": "web",
                "kind": "dicomweb",
                "url": "https://archive.example/dicom-web",
                "auth": {"type": "basic", "username": "u", "secret_file": str(missing)},
            }
        ],
        routing={"default": ["web"]},
    )
    service = NodeService(cfg, scp=False, worker=False)
    with pytest.raises(StartupError) as info:
        service.start()
    assert info.value.exit_code == 2
    assert f"destinations.0.auth: web: auth.secret_file {missing}:" in str(info.value)
    missing.write_text("pw-5678\n")
    missing.chmod(0o600)
    service = NodeService(cfg, scp=False, worker=False)
    service.start()
    service.stop(timeout=30)
