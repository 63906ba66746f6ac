"""Issue 16, items 2, 8 and 9: DICOM TLS identities and failures, said and counted.

- 16.2 A certificate is tied to its caller: `[[allowed_callers]]` takes `tls_subject`
  (the CN, or with `=` the whole RFC 4514 subject), `tls_san` (one of these DNS names / IP
  addresses in the subjectAltName) and `tls_fingerprint_sha256`. Any other certificate of
  the site CA (CN=EVIL-HOST calling as PACS1), no certificate, or no TLS is refused during
  association negotiation: A-ASSOCIATE-RJ permanent, service user, "calling AE title not
  recognised", logged with the peer's address and the presented subject. An identity
  implies `require_tls`.
- 16.8 An outbound TLS verification failure (hostname mismatch, self-signed certificate)
  is stored and shown as itself, not "aborted or no answer", and is not retried: the
  delivery fails at once, until the config is reloaded (SIGHUP) or `resend` is used.
- 16.9 A refused inbound TLS handshake is logged in one line with the peer's address and
  the reason, no traceback, and counted in `ctmtl_associations_total{outcome="rejected"}`.

Real parts: certificates made by the openssl CLI (tests/ops/certs.py), the in-process
node (its real SCP, exporter and SIGHUP reload), DCMTK `storescu`/`storescp` with `+tls`
and pynetdicom peers with `ssl` contexts.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ops.certs import CertPair, make_ca
from ops.conftest import NodeProcess, base_sections, write_toml
from ops.conftest import make_config as make_config  # the fixtures, re-exported
from ops.conftest import node_process as node_process
from ops.synth import write_series
from pydantic import ValidationError
from pynetdicom import AE
from sqlalchemy import select, update

from dicom_node.cli import main
from dicom_node.config import AllowedCaller, ConfigError, load_config
from dicom_node.db import Delivery, DeliveryState, Instance, Series, SeriesState
from dicom_node.service import NodeService
from dicom_node.tls import TLSSettings, parse_subject, tls_args
from helpers import add_done_result, dcmtk_tool, free_port, port_open, stop_process, wait_for
from reliability.nodes import metric

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.161", "1.2.826.0.1.3680043.8.498.161.2"


# ----------------------------------------------------------------------------- PKI


def _fingerprint(cert: Path) -> str:
    """`openssl x509 -fingerprint -sha256`: `AB:CD:...`, as an administrator copies it."""
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return out.strip().split("=", 1)[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A site CA with the node's, a PACS's and several callers' certificates; a rogue CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    base = tmp_path_factory.mktemp("pki")
    ca = make_ca(base / "site", cn="ctmtl identity test CA")
    rogue = make_ca(base / "rogue", cn="rogue CA")
    hospital = "/C=DE/O=Hospital"
    return {
        "ca": ca.ca_cert,
        "rogue_ca": rogue.ca_cert,
        "rogue_ca_key": rogue.ca_key,
        "node": ca.issue("node", "ctmtl-node", server=True),
        "pacs_server": ca.issue("pacs-server", "pacs.example", server=True),
        "pacs1": ca.issue(
            "pacs1", "pacs1.hospital.example", server=False, san="DNS:pacs1.hospital.example"
        ),
        "evil": ca.issue("evil", "EVIL-HOST", server=False),
        "pacs2": ca.issue("pacs2", "", server=False, subject=f"{hospital}/OU=Radiology/CN=pacs2"),
        "pacs2_cardio": ca.issue(
            "pacs2-cardio", "", server=False, subject=f"{hospital}/OU=Cardiology/CN=pacs2"
        ),
        "pacs3": ca.issue(
            "pacs3", "modality-3", server=False, san="DNS:pacs3.hospital.example,IP:10.0.0.3"
        ),
        "pacs4": ca.issue("pacs4", "pacs4", server=False),
        "rogue_client": rogue.issue("rogue-client", "pacs1.hospital.example", server=False),
    }


def _tls_table(site: dict[str, Any], **extra: Any) -> dict[str, Any]:
    node: CertPair = site["node"]
    return {
        "enabled": True,
        "port": free_port(),
        "cert_file": str(node.cert),
        "key_file": str(node.key),
        "ca_file": str(site["ca"]),
        **extra,
    }


def _storescu(
    port: int, files: list[Path], *tls: str, aet: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk_tool("storescu"), *tls, "-aet", aet, "-aec", "CTMTL", "-to", "10", "-ta", "10",
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _with(site: dict[str, Any], name: str) -> tuple[str, ...]:
    pair: CertPair = site[name]
    return ("+tls", str(pair.key), str(pair.cert), "+cf", str(site["ca"]))


def _stored(node: NodeService) -> int:
    with node.db.session() as s:
        return len(s.scalars(select(Instance.id)).all())


def _rejected(node: NodeService) -> float:
    text = node.metrics.exposition().decode()
    m = re.search(r'ctmtl_associations_total\{outcome="rejected"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _warnings(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and needle in r.getMessage()
    ]


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert not [r for r in caplog.records if "Traceback" in r.getMessage()]


# ----------------------------------------------------------------------------- 16.2


def test_identity_settings_are_checked_in_the_config(site: dict[str, Any], tmp_path: Path) -> None:
    caller = AllowedCaller(ae_title="PACS1", tls_subject="pacs1.hospital.example")
    assert caller.require_tls  # implied by the identity
    fp = _fingerprint(site["pacs4"].cert)
    pinned = AllowedCaller(ae_title="PACS4", tls_fingerprint_sha256=fp)
    assert pinned.tls_fingerprint_sha256 == fp.replace(":", "").lower()
    with pytest.raises(ValidationError, match="need TLS: leave require_tls out"):
        AllowedCaller(ae_title="PACS1", tls_san=["pacs1.hospital.example"], require_tls=False)
    with pytest.raises(ValidationError, match="not a SHA-256 fingerprint"):
        AllowedCaller(ae_title="PACS4", tls_fingerprint_sha256="AB:CD")
    with pytest.raises(ValidationError, match="neither a DNS name nor an IP address"):
        AllowedCaller(ae_title="PACS3", tls_san=["pacs 3"])
    with pytest.raises(ValidationError, match="is not an IP address"):
        AllowedCaller(ae_title="PACS3", tls_san=["IP:pacs3"])
    with pytest.raises(ValidationError, match="is not TYPE=value"):
        AllowedCaller(ae_title="PACS2", tls_subject="CN=pacs2,Hospital")
    # RFC 4514 and OpenSSL's slash form name the same subject, in any order and case
    assert parse_subject("CN=pacs2, OU=Radiology, O=Hospital, C=DE") == parse_subject(
        "/C=DE/O=Hospital/OU=Radiology/CN=pacs2"
    )
    assert parse_subject(r"CN=a\,b+O=x") == (("CN", "a,b"), ("O", "x"))

    def config(callers: list[dict[str, Any]], **tls: Any) -> Path:
        data = base_sections(
            tmp_path, node={"tls": _tls_table(site, **tls)}, allowed_callers=callers
        )
        return write_toml(tmp_path / "node.toml", data)

    with pytest.raises(ConfigError, match=r"\['PACS1'\] require TLS but node.tls is off"):
        load_config(config([{"ae_title": "PACS1", "tls_subject": "pacs1"}], enabled=False), {})
    with pytest.raises(ConfigError, match=r"node\.tls\.verify_peer is false"):
        load_config(
            config(
                [{"ae_title": "PACS1", "tls_subject": "pacs1"}],
                verify_peer=False,
                require_client_cert=False,
            ),
            environ={},
        )
    with pytest.raises(ConfigError, match=r"allowed_callers\.0\.tls_fingerprint_sha256"):
        load_config(config([{"ae_title": "PACS4", "tls_fingerprint_sha256": "xyz"}]), environ={})
    cfg = load_config(config([{"ae_title": "PACS1", "tls_subject": "pacs1"}]), environ={})
    assert cfg.allowed_callers[0].require_tls


@pytest.fixture
def identity_node(
    site: dict[str, Any], make_config: Any, start_node: Callable[..., NodeService]
) -> NodeService:
    """A node with a plain and a TLS port, client certificates optional, callers pinned."""
    cfg = make_config(
        node={"tls": _tls_table(site, require_client_cert=False)},
        allowed_callers=[
            {"ae_title": "PACS1", "host": "127.0.0.1", "tls_subject": "pacs1.hospital.example"},
            {"ae_title": "PACS2", "tls_subject": "CN=pacs2, OU=Radiology, O=Hospital, C=DE"},
            {"ae_title": "PACS3", "tls_san": ["pacs3.hospital.example", "10.0.0.3"]},
            {"ae_title": "PACS4", "tls_fingerprint_sha256": _fingerprint(site["pacs4"].cert)},
            {"ae_title": "ANYCERT"},
        ],
    )
    return start_node(cfg, worker=False, exporter=False)


@pytest.mark.slow
def test_a_certificate_of_the_site_ca_calls_only_as_its_own_caller(
    identity_node: NodeService,
    site: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = identity_node
    assert node.scp is not None and node.scp.tls_port is not None
    port = node.scp.tls_port
    _, files = write_series(tmp_path / "series", n_slices=8, size=32)
    refused = 0

    def refused_as(aet: str, *tls: str, because: str) -> str:
        nonlocal refused
        before = _stored(node)
        proc = _storescu(port, files[:1], *tls, aet=aet)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        assert "Association Rejected" in out, out
        assert "Calling AE Title Not Recognized" in out, out
        refused += 1
        assert _stored(node) == before
        (line,) = _warnings(caplog, f"association rejected: calling AE title {aet!r}")[-1:]
        assert re.search(rf"from 127\.0\.0\.1:\d+ presented {re.escape(because)}", line), line
        return line

    fresh = iter(files)  # each accepted caller stores an instance not stored before

    def stores(aet: str, *tls: str) -> None:
        before = _stored(node)
        proc = _storescu(port, [next(fresh)], *tls, aet=aet)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _stored(node) == before + 1

    # the issue's case: CN=EVIL-HOST, signed by the site CA, as the pinned PACS1
    line = refused_as("PACS1", *_with(site, "evil"), because="certificate 'CN=EVIL-HOST'")
    assert "its subject CN is 'EVIL-HOST', not 'pacs1.hospital.example'" in line
    stores("PACS1", *_with(site, "pacs1"))
    stores("ANYCERT", *_with(site, "evil"))  # a caller with no identity: any site cert
    # no certificate at all (client certificates are optional on this node)
    line = refused_as("PACS1", "+tla", "+cf", str(site["ca"]), because="no client certificate")
    assert "no client certificate was presented" in line
    stores("ANYCERT", "+tla", "+cf", str(site["ca"]))

    # the whole subject: same CN, another OU is another certificate
    line = refused_as(
        "PACS2",
        *_with(site, "pacs2_cardio"),
        because="certificate 'CN=pacs2,OU=Cardiology,O=Hospital,C=DE'",
    )
    assert "its subject is not 'CN=pacs2, OU=Radiology, O=Hospital, C=DE'" in line
    stores("PACS2", *_with(site, "pacs2"))

    # subjectAltName: one of the names must be there
    line = refused_as("PACS3", *_with(site, "pacs1"), because="certificate")
    assert "its subjectAltName (DNS:pacs1.hospital.example) has none of" in line
    stores("PACS3", *_with(site, "pacs3"))

    # fingerprint pin
    line = refused_as("PACS4", *_with(site, "pacs1"), because="certificate")
    assert "its SHA-256 fingerprint is" in line
    stores("PACS4", *_with(site, "pacs4"))

    # the plain port: an identity implies require_tls
    plain = _storescu(node.port, files[:1], aet="PACS1")
    assert plain.returncode != 0 and "Association Rejected" in plain.stdout + plain.stderr
    refused += 1
    assert _warnings(caplog, "calling AE title 'PACS1' must use the TLS port")

    assert _rejected(node) == refused
    _no_tracebacks(caplog)


def test_pynetdicom_peer_gets_a_permanent_rejection_for_a_foreign_certificate(
    identity_node: NodeService, site: dict[str, Any]
) -> None:
    assert identity_node.scp is not None and identity_node.scp.tls_port is not None
    port = identity_node.scp.tls_port

    def associate(cert: str) -> Any:
        pair: CertPair = site[cert]
        settings = TLSSettings(
            enabled=True, cert_file=pair.cert, key_file=pair.key, ca_file=site["ca"]
        )
        ae = AE(ae_title="PACS1")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = 10
        return ae.associate(
            "127.0.0.1",
            port,
            ae_title="CTMTL",
            tls_args=tls_args(settings, "127.0.0.1"),
        )

    evil = associate("evil")
    assert evil.is_rejected
    rj = evil.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    good = associate("pacs1")
    assert good.is_established
    status = good.send_c_echo()
    good.release()
    assert status.Status == 0x0000


# ----------------------------------------------------------------------------- 16.9


@pytest.mark.slow
def test_refused_tls_handshakes_are_logged_with_the_peer_and_counted(
    site: dict[str, Any],
    make_config: Any,
    start_node: Callable[..., NodeService],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = make_config(
        node={"tls": _tls_table(site), "acse_timeout_s": 1.5},  # client certificates required
        allowed_callers=[{"ae_title": "PACS1", "tls_subject": "pacs1.hospital.example"}],
    )
    node = start_node(cfg, worker=False, exporter=False)
    assert node.scp is not None and node.scp.tls_port is not None
    port = node.scp.tls_port
    _, files = write_series(tmp_path / "series", n_slices=1, size=32)
    rogue: CertPair = site["rogue_client"]
    pacs1: CertPair = site["pacs1"]
    cases = [
        # a certificate of another CA (with the CN of an allowed caller)
        (("+tls", str(rogue.key), str(rogue.cert), "+cf", str(site["ca"])),
         "client certificate verify failed: unable to get local issuer certificate"),
        # no client certificate while the node requires one
        (("+tla", "+cf", str(site["ca"])),
         "no client certificate (node.tls.require_client_cert = true)"),
        # plain DICOM on the TLS port
        ((), "not a TLS handshake (first byte 0x01: a plain DICOM association?)"),
        # a caller that does not trust the node's certificate
        (("+tls", str(pacs1.key), str(pacs1.cert), "+cf", str(site["rogue_ca"])),
         "the caller refused the node's certificate (tlsv1 alert unknown ca)"),
    ]  # fmt: skip
    for n, (tls, reason) in enumerate(cases, start=1):
        proc = _storescu(port, files, *tls, aet="PACS1")
        assert proc.returncode != 0, proc.stdout + proc.stderr
        wait_for(lambda r=reason: _warnings(caplog, r), 10, f"refusal {n} logged")  # type: ignore[misc]
        assert _rejected(node) == n
        (line,) = _warnings(caplog, reason)
        assert re.fullmatch(
            rf"TLS connection from 127\.0\.0\.1:\d+ refused: {re.escape(reason)}", line
        ), line

    # a peer that starts a handshake and stalls: refused after node.acse_timeout_s
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(b"\x16\x03\x01")
        peer = f"127.0.0.1:{stalled.getsockname()[1]}"
        stalled_line = f"TLS connection from {peer} refused: no complete TLS handshake within 1.5 s"
        wait_for(lambda: _warnings(caplog, stalled_line), 10, "the stalled handshake refused")
    assert _rejected(node) == 5

    # a TCP probe (connect, close) is no association attempt: not counted, not warned
    with socket.create_connection(("127.0.0.1", port)) as probe:
        probe_peer = f"127.0.0.1:{probe.getsockname()[1]}"
    time.sleep(0.5)
    assert _rejected(node) == 5
    assert not _warnings(caplog, probe_peer)

    # the listener still serves the right caller; nothing was logged with a traceback
    ok = _storescu(port, files, *_with(site, "pacs1"), aet="PACS1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert _stored(node) == 1
    assert len(_warnings(caplog, "TLS connection from")) == 5
    _no_tracebacks(caplog)


@pytest.mark.slow
def test_the_node_process_logs_each_refusal_in_one_line(
    site: dict[str, Any], node_process: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """`ctmtl-node serve` as installed: its log (with pynetdicom's lines) and /metrics."""
    port, metrics_port = free_port(), free_port()
    tls = _tls_table(site)
    data = base_sections(
        tmp_path,
        node={"port": port, "tls": tls},
        worker={"enabled": False},
        metrics={"enabled": True, "port": metrics_port},
        allowed_callers=[{"ae_title": "PACS1", "tls_subject": "pacs1.hospital.example"}],
    )
    node = node_process("serve", "--config", str(write_toml(tmp_path / "node.toml", data)))
    wait_for(lambda: port_open(tls["port"]) or not node.alive(), 60, "the TLS listener")
    assert node.alive(), node.log()
    _, files = write_series(tmp_path / "series", n_slices=1, size=32)
    rogue: CertPair = site["rogue_client"]
    url = f"http://127.0.0.1:{metrics_port}"

    def rejected() -> float:
        return metric(url, "ctmtl_associations_total", outcome="rejected")

    bad_ca = _storescu(
        tls["port"], files, "+tls", str(rogue.key), str(rogue.cert), "+cf", str(site["ca"]),
        aet="PACS1",
    )  # fmt: skip
    assert bad_ca.returncode != 0
    wait_for(lambda: rejected() == 1, 10, "the refused handshake counted")
    evil = _storescu(tls["port"], files, *_with(site, "evil"), aet="PACS1")
    assert evil.returncode != 0 and "Association Rejected" in evil.stdout + evil.stderr
    wait_for(lambda: rejected() == 2, 10, "the foreign certificate counted")
    good = _storescu(tls["port"], files, *_with(site, "pacs1"), aet="PACS1")
    assert good.returncode == 0, good.stdout + good.stderr

    log = node.log()
    refused = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(refused) == 2, log
    assert re.search(
        r"WARNING .* TLS connection from 127\.0\.0\.1:\d+ refused: client certificate verify "
        r"failed: unable to get local issuer certificate$",
        refused[0],
    ), refused[0]
    assert re.search(
        r"WARNING .* association rejected: calling AE title 'PACS1' from 127\.0\.0\.1:\d+ "
        r"presented certificate 'CN=EVIL-HOST', not the one allowed_callers names for it",
        refused[1],
    ), refused[1]
    assert "Traceback" not in log and "SSLError" not in log, log
    assert node.stop(30) == 0


# ----------------------------------------------------------------------------- 16.8


class TLSStoreSCP:
    """DCMTK storescp with TLS on a given port (a PACS whose certificate gets fixed)."""

    def __init__(self, folder: Path, port: int, cert: Path, key: Path, ca: Path) -> None:
        self.folder, self.port = folder, port
        folder.mkdir(parents=True, exist_ok=True)
        self._log = (folder.parent / f"{folder.name}.log").open("a")
        self.proc = subprocess.Popen(
            [dcmtk_tool("storescp"), "--aetitle", "PACS", "--output-directory", str(folder),
             "--accept-all", "--unique-filenames", "+tls", str(key), str(cert), "+cf", str(ca),
             str(port)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(lambda: port_open(port), 20, f"storescp on port {port}")

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self._log.close()


@pytest.fixture
def pacs_servers() -> Iterator[list[TLSStoreSCP]]:
    servers: list[TLSStoreSCP] = []
    yield servers
    for server in servers:
        server.stop()


def _exporting_node(
    tmp_path: Path,
    start_node: Callable[..., NodeService],
    site: dict[str, Any],
    dest_port: int,
    recheck_s: float,
    **tls: Any,
) -> tuple[NodeService, Path, Callable[..., None]]:
    """An exporting node (no SCP, no worker) with one result queued for the TLS PACS."""
    client: CertPair = site["pacs1"]

    def write(**extra: Any) -> None:  # the config file with these `tls` keys added
        dest_tls = {
            "enabled": True,
            "cert_file": str(client.cert),
            "key_file": str(client.key),
            "ca_file": str(site["ca"]),
            **extra,
        }
        dest = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": dest_port,
                "timeout_s": 5, "tls": dest_tls}  # fmt: skip
        data = base_sections(
            tmp_path,
            destinations=[dest],
            routing={"default": ["pacs"]},
            export={"max_attempts": 8, "initial_backoff_s": 0.1, "max_backoff_s": 0.2,
                    "recheck_failed_s": recheck_s},
            metrics={"enabled": False},
        )  # fmt: skip
        write_toml(tmp_path / "node.toml", data)

    write(**tls)
    cfg_path = tmp_path / "node.toml"
    node = start_node(
        load_config(cfg_path, environ={}), scp=False, worker=False, config_path=cfg_path
    )
    _, files = write_series(tmp_path / "result", n_slices=2, size=32)
    add_done_result(
        node.db, node.config.destinations, files[0], files[1], study_uid=STUDY,
        series_uid=SERIES, instance_file=str(files[0]), calling_ae="MODALITY",
    )  # fmt: skip
    with node.db.session() as s:
        s.execute(update(Series).values(state=SeriesState.DONE))
    return node, cfg_path, write


def _delivery(node: NodeService) -> Delivery:
    with node.db.session() as s:
        return s.scalars(select(Delivery)).one()


def _status(capsys: pytest.CaptureFixture[str], cfg: Path) -> str:
    capsys.readouterr()
    assert main(["status", "--config", str(cfg)]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_hostname_mismatch_fails_at_once_with_its_cause_until_the_config_is_reloaded(
    site: dict[str, Any],
    start_node: Callable[..., NodeService],
    pacs_servers: list[TLSStoreSCP],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    pacs_cert: CertPair = site["pacs_server"]  # names 127.0.0.1 and localhost
    pacs = TLSStoreSCP(tmp_path / "pacs", free_port(), pacs_cert.cert, pacs_cert.key, site["ca"])
    pacs_servers.append(pacs)
    node, cfg, write = _exporting_node(
        tmp_path, start_node, site, pacs.port, 0.3, server_hostname="pacs.elsewhere.example"
    )

    wait_for(lambda: _delivery(node).state == DeliveryState.FAILED, 30, "the delivery to fail")
    d = _delivery(node)
    assert d.attempts == 1  # not retried: no retry can pass a hostname check
    error = d.last_error or ""
    assert error.startswith(
        "TLS: certificate verify failed: hostname mismatch, certificate is not valid for "
        "'pacs.elsewhere.example'"
    ), error
    assert "aborted or no answer" not in error
    (line,) = [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
        and "delivery of result" in r.getMessage()
    ]  # fmt: skip
    assert "failed for good after 1 attempt(s): TLS: certificate verify failed" in line
    assert "reload the node (SIGHUP) or `ctmtl-node resend`" in line
    out = _status(capsys, cfg)
    assert f"series {SERIES}  [delivery failed: pacs]" in out
    assert "-> pacs         failed    1x  TLS: certificate verify failed: hostname mismatch" in out

    time.sleep(1.5)  # the periodic C-ECHO fails the same way: nothing is queued again
    assert _delivery(node).state == DeliveryState.FAILED and _delivery(node).attempts == 1
    assert pacs.files() == []

    write()  # the administrator drops the wrong server_hostname, then SIGHUP
    assert node.reload()
    wait_for(lambda: len(pacs.files()) == 2, 30, "SEG and SR at the PACS")
    wait_for(lambda: _delivery(node).state == DeliveryState.DONE, 30, "delivery recorded")
    assert [r for r in caplog.records if "answers C-ECHO again" in r.getMessage()]
    _no_tracebacks(caplog)


@pytest.mark.slow
def test_self_signed_peer_fails_at_once_and_resend_sends_once_it_is_fixed(
    site: dict[str, Any],
    start_node: Callable[..., NodeService],
    pacs_servers: list[TLSStoreSCP],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    # a PACS that serves a self-signed certificate (not one of the site CA)
    selfsigned = TLSStoreSCP(
        tmp_path / "pacs", port, site["rogue_ca"], site["rogue_ca_key"], site["ca"]
    )
    pacs_servers.append(selfsigned)
    node, cfg, _ = _exporting_node(tmp_path, start_node, site, port, 0)  # no periodic echo

    wait_for(lambda: _delivery(node).state == DeliveryState.FAILED, 30, "the delivery to fail")
    d = _delivery(node)
    assert d.attempts == 1
    assert (d.last_error or "").startswith(
        "TLS: certificate verify failed: self-signed certificate"
    ), d.last_error
    assert "TLS: certificate verify failed: self-signed certificate" in _status(capsys, cfg)

    # the PACS gets a certificate of the site CA: still failed until someone resends
    selfsigned.stop()
    pacs_servers.remove(selfsigned)
    pacs_cert: CertPair = site["pacs_server"]
    fixed = TLSStoreSCP(tmp_path / "pacs", port, pacs_cert.cert, pacs_cert.key, site["ca"])
    pacs_servers.append(fixed)
    time.sleep(1.0)
    assert _delivery(node).state == DeliveryState.FAILED and _delivery(node).attempts == 1

    capsys.readouterr()
    assert main(["resend", SERIES, "--config", str(cfg)]) == 0
    assert "pacs: queued" in capsys.readouterr().out
    wait_for(lambda: len(fixed.files()) == 2, 30, "SEG and SR at the PACS")
    wait_for(lambda: _delivery(node).state == DeliveryState.DONE, 30, "delivery recorded")
    _no_tracebacks(caplog)
