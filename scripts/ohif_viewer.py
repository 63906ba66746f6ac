"""OHIF v3 on loopback against Orthanc's DICOMweb plugin: look at the node's results in a
real viewer (the viewer test, and `scripts/viewer.sh` for an admin by hand).

Standard library only, so that `python3 scripts/ohif_viewer.py FOLDER...` runs without
the node's virtual environment. Three parts:

- `ensure_ohif`: the prebuilt viewer of npm `@ohif/app` (pinned version, tarball checked
  against its registry integrity hash), unpacked without its microscopy viewer and ONNX
  runtime into a cache folder outside git, keyed by version.
- `OrthancDicomWeb`: Debian Orthanc from a temp folder with only the DICOMweb plugin, its
  DICOM port off and HTTP refused from other hosts; upload by `POST /instances`.
- `ViewerServer`: one origin for the viewer files, our `app-config.js` and the DICOMweb
  API (proxied to Orthanc with the browser's Host header, or Orthanc writes bulk-data URLs
  on its own port), with the cross-origin isolation headers OHIF's workers want.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import http.server
import json
import logging
import os
import posixpath
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("ohif_viewer")

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
# `npm view @ohif/app@3.13.2 dist.integrity`: the tarball must hash to this
OHIF_INTEGRITY = (
    "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87B"
    "KxFfpq+jd5xXZB9E8EA=="
)
# not needed to show CT, SEG, SR and SC (whole-slide microscopy; ONNX models for AI tools)
DROPPED = ("ort", "dicom-microscopy-viewer")

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

# the two roots the viewer reads; both proxied to Orthanc
PROXIED = ("/dicom-web", "/wado")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
# cross-origin isolation (SharedArrayBuffer for OHIF's decoders); every file is same-origin
ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}

APP_CONFIG = """window.config = {
  name: 'ctmtl-viewer',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // hydrate a SEG when its series is opened, without asking
  disableConfirmationPrompts: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (ctmtl viewer)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


# --------------------------------------------------------------------------- the viewer


def cache_root() -> Path:
    """Where unpacked viewers live: env CTMTL_OHIF_CACHE, else the user's cache folder."""
    if os.environ.get("CTMTL_OHIF_CACHE"):
        return Path(os.environ["CTMTL_OHIF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctmtl" / "ohif"


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def _dist_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The viewer's files (`package/dist/...`) minus DROPPED, renamed relative to dist."""
    for member in tar.getmembers():
        parts = member.name.split("/")
        if len(parts) < 3 or parts[:2] != ["package", "dist"] or parts[2] in DROPPED:
            continue
        if not (member.isfile() or member.isdir()) or ".." in parts:
            continue
        member.name = "/".join(parts[2:])
        yield member


def ensure_ohif(root: Path | None = None, version: str = OHIF_VERSION) -> Path:
    """The unpacked `dist/` of the pinned OHIF; fetched by `npm pack` once per version.

    The tarball must match OHIF_INTEGRITY, or nothing is unpacked. The folder appears
    under its final name only when complete, so a cut-off fetch is fetched again.
    """
    if version != OHIF_VERSION:
        raise ValueError(f"only {OHIF_PACKAGE}@{OHIF_VERSION} is pinned, not {version}")
    root = root or cache_root()
    dist = root / version / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fetch the OHIF viewer (apt install npm)")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        logger.info("fetching %s@%s with npm pack", OHIF_PACKAGE, version)
        subprocess.run(
            [npm, "pack", f"{OHIF_PACKAGE}@{version}", "--pack-destination", tmp, "--silent"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=900,
        )
        (tarball,) = Path(tmp).glob("*.tgz")
        found = _integrity(tarball)
        if found != OHIF_INTEGRITY:
            raise RuntimeError(f"{tarball.name}: integrity {found} is not the pinned one")
        staged = Path(tmp) / "dist"
        with tarfile.open(tarball) as tar:
            members = list(_dist_members(tar))  # names checked there
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
                tar.extractall(staged, members=members, filter="data")
            else:
                tar.extractall(staged, members=members)
        if not (staged / "index.html").is_file():
            raise RuntimeError(f"{tarball.name} has no package/dist/index.html")
        (root / version).mkdir(exist_ok=True)
        with contextlib.suppress(FileExistsError, OSError):
            staged.rename(dist)  # another process may have won the race: theirs is whole
    logger.info("OHIF %s unpacked in %s", version, dist)
    return dist


# --------------------------------------------------------------------------- Orthanc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server that cannot bind port 0 itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancDicomWeb:
    """Orthanc in `folder` with only the DICOMweb plugin: no DICOM port, loopback HTTP."""

    def __init__(self, folder: Path, http_port: int | None = None) -> None:
        for path in (ORTHANC, DICOMWEB_PLUGIN):
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} (apt install orthanc orthanc-dicomweb)")
        self.folder = folder
        self.http_port = http_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ctmtl-viewer",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # Orthanc 1.10 cannot bind to one address
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "LuaScripts": [],
            "HttpThreadsCount": 8,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "WadoRoot": "/wado"},
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log_path = folder / "orthanc.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [ORTHANC, str(folder / "orthanc.json")], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while not self._up():
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"Orthanc did not answer in 60 s: {self.log_path}")
            time.sleep(0.2)

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log_path}")
        try:
            return bool(self.get("/system"))
        except (urllib.error.URLError, ConnectionError):
            return False

    def request(
        self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json"
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=300) as resp:
            return bytes(resp.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def upload(self, files: Iterable[Path]) -> set[str]:
        """POST each file to /instances; returns the Orthanc ids of the studies touched."""
        studies = set()
        for path in files:
            answer = json.loads(
                self.request("POST", "/instances", path.read_bytes(), "application/dicom")
            )
            studies.add(answer["ParentStudy"])
        return studies

    def study_uids(self) -> list[str]:
        return [
            self.get(f"/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"]
            for sid in self.get("/studies")
        ]

    def stop(self) -> None:
        """Stop and wait for the pid: Orthanc holds its SQLite lock until it has exited."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --------------------------------------------------------------------------- one origin


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if any(path == root or path.startswith(root + "/") for root in PROXIED):
            self._proxy()
        elif self.command not in ("GET", "HEAD"):
            self._send(405, b"", "text/plain")
        elif path == "/app-config.js":
            self._send(200, self.server.app_config.encode(), "application/javascript")
        else:
            self._file(path)

    def _send(
        self, status: int, body: bytes, ctype: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (*headers, *ISOLATION.items()):
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _file(self, path: str) -> None:
        """A file of dist/, else index.html for the viewer's own routes (`/viewer?...`)."""
        dist = self.server.dist
        relative = posixpath.normpath(urllib.parse.unquote(path)).lstrip("/")
        target = (dist / relative).resolve() if relative not in ("", ".") else dist / "index.html"
        if not target.is_relative_to(dist) or not target.is_file():
            if posixpath.splitext(relative)[1]:  # a missing asset stays missing
                self._send(404, b"not found", "text/plain")
                return
            target = dist / "index.html"
        suffix = target.suffix.lower()
        content_type = {
            ".wasm": "application/wasm",
            ".js": "application/javascript",
            ".mjs": "application/javascript",
            ".css": "text/css",
            ".html": "text/html; charset=utf-8",
            ".json": "application/json",
            ".svg": "image/svg+xml",
            ".woff2": "font/woff2",
            ".png": "image/png",
            ".ico": "image/x-icon",
        }.get(suffix, "application/octet-stream")
        self._send(200, target.read_bytes(), content_type)

    def _proxy(self) -> None:
        """Forward to Orthanc as it came, Host header included, and relay the answer."""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=300)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            logger.warning("proxy %s %s: %s", self.command, self.path, exc)
            self._send(502, str(exc).encode(), "text/plain")
            return
        finally:
            conn.close()
        kept = [
            (k, v)
            for k, v in resp.getheaders()
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-length", "content-type")
        ]
        content_type = resp.getheader("Content-Type") or "application/octet-stream"
        self._send(resp.status, data, content_type, kept)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that drops a kept-alive connection is no error worth a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def __init__(self, port: int, dist: Path, orthanc_port: int, app_config: str) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        self.app_config = app_config


class ViewerServer:
    """The viewer, its configuration and Orthanc's DICOMweb API on one loopback origin."""

    def __init__(
        self, dist: Path, orthanc_port: int, port: int = 0, app_config: str = APP_CONFIG
    ) -> None:
        self._server = _Server(port, dist, orthanc_port, app_config)
        self.port = int(self._server.server_address[1])
        self.origin = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ohif-viewer", daemon=True
        )
        self._thread.start()

    def study_url(self, study_uid: str, hanging_protocol: str | None = "@ohif/seg") -> str:
        query = {"StudyInstanceUIDs": study_uid}
        if hanging_protocol:
            query["hangingProtocolId"] = hanging_protocol
        return f"{self.origin}/viewer?{urllib.parse.urlencode(query)}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# --------------------------------------------------------------------------- by hand


def dicom_files(folders: Iterable[Path]) -> list[Path]:
    """The files under `folders` that start like DICOM Part 10 (DICM at byte 128)."""
    found = []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with path.open("rb") as f:
                if f.read(132)[128:] == b"DICM":
                    found.append(path)
    return found


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Show DICOM folders (CT, the node's SEG/SR/SC) in OHIF on loopback; "
        "Ctrl-C stops Orthanc and the viewer and removes their temp folder."
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    parser.add_argument("--port", type=int, default=9042, help="viewer port (default 9042)")
    parser.add_argument("--cache", type=Path, help=f"OHIF cache folder (default {cache_root()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    files = dicom_files(args.folders)
    if not files:
        print(f"no DICOM files under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ctmtl-viewer-") as tmp:
        try:
            dist = ensure_ohif(args.cache)
            orthanc = OrthancDicomWeb(Path(tmp) / "orthanc")
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            orthanc.upload(files)
            server = ViewerServer(dist, orthanc.http_port, args.port)
            print(f"{len(files)} files in Orthanc; open in a browser on this host:")
            for uid in orthanc.study_uids():
                print(f"  {server.study_url(uid)}")
            print(f"  (study list: {server.origin}/ ; Ctrl-C stops)")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
            print("stopping")
            server.stop()
        finally:
            orthanc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
