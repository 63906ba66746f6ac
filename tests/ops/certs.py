"""Test PKI made with the openssl CLI: a CA, a server and client certificates."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TestPKI:
    ca_cert: Path
    ca_key: Path
    folder: Path

    def issue(
        self,
        name: str,
        cn: str,
        server: bool,
        *,
        subject: str | None = None,
        san: str = "IP:127.0.0.1,DNS:localhost",
    ) -> CertPair:
        """A leaf certificate signed by this CA (SAN 127.0.0.1 + localhost by default).

        `subject` (OpenSSL form, `/C=DE/O=Hospital/CN=x`) replaces `/CN=cn`; `san` is the
        subjectAltName extension value.
        """
        key, csr, cert = (self.folder / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        ext = self.folder / f"{name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        ext.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n"
            f"subjectAltName={san}\n"
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", csr.name,
            "-subj", subject or f"/CN={cn}", cwd=self.folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", csr.name, "-CA", self.ca_cert.name, "-CAkey",
            self.ca_key.name, "-CAcreateserial", "-out", cert.name, "-days", "2",
            "-sha256", "-extfile", ext.name, cwd=self.folder,
        )  # fmt: skip
        return CertPair(cert, key)


def make_ca(folder: Path, name: str = "ca", cn: str = "ctmtl test CA") -> TestPKI:
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder,
    )  # fmt: skip
    return TestPKI(folder / f"{name}.pem", folder / f"{name}.key", folder)
