"""`ctmtl-node echo AE@host:port --tls-*`: try a TLS peer that is not in the config yet."""

from __future__ import annotations

from typing import Any

import pytest

from dicom_node.cli import main


def test_echo_address_over_tls(
    storescp: Any, pki: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    pacs = pki["pacs"]
    server = storescp(
        "tls-pacs", "PACS", tls=["+tls", str(pacs.key), str(pacs.cert), "+cf", str(pki["ca"])]
    )
    target = f"PACS@127.0.0.1:{server.port}"
    client = pki["client"]
    cert = ["--tls-cert", str(client.cert), "--tls-key", str(client.key)]
    mutual = ["--tls-ca", str(pki["ca"]), *cert]

    assert main(["echo", target, "--timeout", "5", *mutual]) == 0
    out = capsys.readouterr().out
    assert "success" in out and "(TLS)" in out

    # the same peer in plain TCP does not answer
    assert main(["echo", target, "--timeout", "5"]) == 1
    capsys.readouterr()
    # trusting another CA: the peer's certificate is refused
    rogue = ["--tls-ca", str(pki["rogue_ca"]), *cert]
    assert main(["echo", target, "--timeout", "5", *rogue]) == 1
    capsys.readouterr()
    # the name in its certificate is checked against --tls-server-name (default: the host)
    wrong_name = [*mutual, "--tls-server-name", "pacs.elsewhere.example"]
    assert main(["echo", target, "--timeout", "5", *wrong_name]) == 1
    capsys.readouterr()

    # usage mistakes are exit 2 with a message, before any connection
    assert main(["echo", target, "--tls-cert", str(client.cert)]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert main(["echo", target, *cert]) == 2
    assert "--tls-ca" in capsys.readouterr().err
    assert main(["echo", target, "--tls-ca", str(server.folder / "missing.pem")]) == 1
    assert "missing.pem does not exist" in capsys.readouterr().out
