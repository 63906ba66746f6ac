"""DICOM TLS, inbound (DCMTK storescu -> node) and outbound (node -> DCMTK storescp)."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dicom_node.cli import main
from dicom_node.config import load_config
from dicom_node.db import Instance
from dicom_node.export import echo, peer_for
from dicom_node.export import send_files as export_files
from dicom_node.service import NodeService
from dicom_node.tls import (
    InboundTLSSettings,
    TLSConfigError,
    TLSSettings,
    client_context,
    server_context,
    tls_args,
)
from helpers import dcmtk_tool, free_port
from ops.conftest import send_files, write_toml
from ops.synth import write_series

# ----------------------------------------------------------------------------- settings


def test_settings_validation() -> None:
    with pytest.raises(ValidationError, match="needs ca_file"):
        TLSSettings(enabled=True)
    with pytest.raises(ValidationError, match="cert_file and key_file go together"):
        TLSSettings(enabled=True, ca_file=Path("ca.pem"), cert_file=Path("c.pem"))
    with pytest.raises(ValidationError, match="needs cert_file and key_file"):
        InboundTLSSettings(enabled=True, ca_file=Path("ca.pem"))
    with pytest.raises(ValidationError, match="min_version"):
        TLSSettings(min_version="1.0")  # type: ignore[arg-type]
    assert TLSSettings(enabled=True, verify_peer=False).ca_file is None  # allowed, warned


def test_context_errors_name_the_file(pki: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(TLSConfigError, match=r"missing\.pem does not exist"):
        client_context(TLSSettings(enabled=True, ca_file=missing))
    node = pki["node"]
    with pytest.raises(TLSConfigError, match="cannot load certificate"):  # key of another cert
        server_context(
            InboundTLSSettings(
                enabled=True, cert_file=node.cert, key_file=pki["pacs"].key, ca_file=pki["ca"]
            )
        )
    ctx = server_context(
        InboundTLSSettings(enabled=True, cert_file=node.cert, key_file=node.key, ca_file=pki["ca"])
    )
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls_args(TLSSettings(), "h") is None
    args = tls_args(TLSSettings(enabled=True, ca_file=pki["ca"], server_hostname="pacs"), "h")
    assert args is not None and args[1] == "pacs" and args[0].check_hostname


# ----------------------------------------------------------------------------- inbound


@pytest.fixture
def tls_node(
    make_config: Any, start_node: Callable[..., NodeService], pki: dict[str, Any]
) -> NodeService:
    """A node with a plain port and a TLS port (client certificates required)."""
    node = pki["node"]
    cfg = make_config(
        node={
            "port": 0,
            "ae_title": "CTMTL",
            "tls": {
                "enabled": True,
                "port": free_port(),
                "cert_file": str(node.cert),
                "key_file": str(node.key),
                "ca_file": str(pki["ca"]),
            },
        },
        allowed_callers=[
            {"ae_title": "STORESCU", "require_tls": True},
            {"ae_title": "PLAIN"},
        ],
    )
    return start_node(cfg, worker=False, exporter=False)


def storescu(
    port: int, files: list[Path], *tls: str, aet: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk_tool("storescu"), *tls, "-aet", aet, "-aec", "CTMTL", "-to", "10", "-ta", "10",
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def stored(service: NodeService) -> int:
    with service.db.session() as s:
        return len(s.query(Instance.id).all())


@pytest.mark.slow
def test_storescu_with_tls_stores_and_others_are_refused(
    tls_node: NodeService, pki: dict[str, Any], tmp_path: Path
) -> None:
    assert tls_node.scp is not None
    tls_port = tls_node.scp.tls_port
    assert tls_port is not None and tls_port != tls_node.port
    _, files = write_series(tmp_path / "series", n_slices=3, size=32)
    client, rogue = pki["client"], pki["rogue_client"]
    good_tls = ("+tls", str(client.key), str(client.cert), "+cf", str(pki["ca"]))

    ok = storescu(tls_port, files, *good_tls)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert stored(tls_node) == 3

    # a peer without TLS on the TLS port: no association
    plain = storescu(tls_port, files[:1])
    assert plain.returncode != 0
    # a certificate from an unknown CA: handshake refused
    bad = storescu(
        tls_port, files[:1], "+tls", str(rogue.key), str(rogue.cert), "+cf", str(pki["ca"])
    )
    assert bad.returncode != 0
    # no client certificate at all
    anon = storescu(tls_port, files[:1], "+tla", "+cf", str(pki["ca"]))
    assert anon.returncode != 0
    # valid TLS, but a calling AE title that is not allowed
    stranger = storescu(tls_port, files[:1], *good_tls, aet="STRANGER")
    assert stranger.returncode != 0
    assert (
        "Rejected" in stranger.stdout + stranger.stderr
        or "reject" in (stranger.stdout + stranger.stderr).lower()
    )
    # STORESCU must use TLS: refused on the plain port; another caller may use it
    assert storescu(tls_node.port, files[:1]).returncode != 0
    _, other = write_series(tmp_path / "other", n_slices=2, size=32, seed=3)
    assert send_files(tls_node.port, other, calling_ae="PLAIN") == [0, 0]
    assert stored(tls_node) == 5  # 3 over TLS + 2 plain from PLAIN; nothing from the refused

    m = tls_node.metrics.exposition().decode()
    assert 'ctmtl_associations_total{outcome="accepted"} 2.0' in m
    # STRANGER, plain STORESCU, and the three refused TLS handshakes (issue 16.9)
    assert 'ctmtl_associations_total{outcome="rejected"} 5.0' in m


def test_pynetdicom_peer_over_tls(
    tls_node: NodeService, pki: dict[str, Any], tmp_path: Path
) -> None:
    assert tls_node.scp is not None and tls_node.scp.tls_port is not None
    _, files = write_series(tmp_path / "series", n_slices=1, size=32)
    client = pki["client"]
    settings = TLSSettings(
        enabled=True, cert_file=client.cert, key_file=client.key, ca_file=pki["ca"]
    )
    # a peer that connects and never finishes its handshake blocks nobody else
    with socket.create_connection(("127.0.0.1", tls_node.scp.tls_port)) as stalled:
        stalled.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then silence
        # the node's certificate names 127.0.0.1 and localhost: hostname checking passes
        args = tls_args(settings, "127.0.0.1")
        assert send_files(tls_node.scp.tls_port, files, "STORESCU", args) == [0]
    # but not a name it does not carry
    wrong = TLSSettings(
        enabled=True, cert_file=client.cert, key_file=client.key, ca_file=pki["ca"],
        server_hostname="pacs.elsewhere.example",
    )  # fmt: skip
    assert send_files(tls_node.scp.tls_port, files, "STORESCU", tls_args(wrong, "127.0.0.1")) == []


# ----------------------------------------------------------------------------- outbound


def tls_storescp(storescp: Any, pki: dict[str, Any]) -> Any:
    pacs = pki["pacs"]
    return storescp(
        "tls-pacs", "PACS", tls=["+tls", str(pacs.key), str(pacs.cert), "+cf", str(pki["ca"])]
    )


@pytest.mark.slow
def test_results_go_out_over_tls(
    storescp: Any, pki: dict[str, Any], tmp_path: Path, make_config: Any
) -> None:
    pacs = tls_storescp(storescp, pki)
    client = pki["client"]
    dest = {
        "name": "pacs",
        "ae_title": "PACS",
        "host": "127.0.0.1",
        "port": pacs.port,
        "timeout_s": 10,
        "tls": {
            "enabled": True,
            "cert_file": str(client.cert),
            "key_file": str(client.key),
            "ca_file": str(pki["ca"]),
        },
    }
    cfg = make_config(destinations=[dest])
    peer = peer_for(cfg.destination("pacs"), "CTMTL")
    assert str(peer).endswith("(TLS)")
    ok, message = echo(peer)
    assert ok, message
    _, files = write_series(tmp_path / "series", n_slices=2, size=32)
    assert len(export_files(peer, files)) == 2
    assert len(pacs.files()) == 2

    # the same peer without TLS: the TLS-only storescp does not answer it
    plain = peer_for(cfg.destination("pacs").model_copy(update={"tls": TLSSettings()}), "CTMTL")
    assert not echo(plain)[0]
    # trusting the wrong CA: the PACS's certificate is refused by the node
    distrust = dict(dest, tls=dict(dest["tls"], ca_file=str(pki["rogue_ca"])))
    cfg2 = make_config(destinations=[distrust])
    ok, message = echo(peer_for(cfg2.destination("pacs"), "CTMTL"))
    assert not ok, message
    assert len(pacs.files()) == 2

    # the CLI resolves the destination with its TLS settings from the config file
    toml = write_toml(
        tmp_path / "node.toml",
        {
            "node": {"ae_title": "CTMTL"},
            "destinations": [dest],
            "spool": {"path": str(tmp_path / "sp")},
        },
    )
    assert load_config(toml, environ={}).destination("pacs").tls.enabled
    assert main(["echo", "pacs", "--config", str(toml)]) == 0
    assert main(["destinations", "--echo", "--config", str(toml)]) == 0
