"""DICOMweb destinations: results stored by STOW-RS, the server checked by QIDO-RS.

The exporter owns deliveries (rows, attempts, backoff, re-checks); this module owns the
HTTP side of one attempt: the session (authentication, TLS, timeout), the STOW-RS request
(`POST {url}/studies`, one multipart/related request per result, encoded by
`dicomweb-client`) and the reading of its answer into "stored", "retry later" or "refused".

How an answer is judged (PS3.18 10.5):

- 200 with every object in ReferencedSOPSequence: delivered (warnings are logged).
- Any objects in FailedSOPSequence, or left out of both sequences, are not stored; the
  delivery fails with the object, its UID and the failure reason. It is retried when every
  reason may pass (0xA7xx out of resources, 0x0110 processing failure, not acknowledged),
  and refused for good otherwise (0xC000 cannot understand, 0x0122 SOP class not
  supported, ...).
- 400, 409, 413, 415 and other 4xx: the server refused the request; not retried, and not
  queued again by the exporter's re-check (only `ctmtl-node resend`), unless every failure
  it names is "out of resources".
- 401, 403: the credentials; 404, 405 and redirects (3xx, not followed): the URL. Not
  retried; queued again once QIDO-RS answers with the (fixed) settings.
- 408, 429, 5xx, connection refused, timeouts: retried with the exporter's backoff.
- A TLS verification failure is not retried (as for DICOM TLS destinations).

Secrets (password or bearer token) are read from their file or environment variable at
each request, registered with `dicom_node.redact` so that no log line shows them, and
never written into an error text.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicom_node.config import DicomWebAuth, DicomWebDestination
from dicom_node.export import STOW_REFUSED, ExportError, tcp_problem
from dicom_node.redact import register_secret

logger = logging.getLogger(__name__)

#: Larger than any result: the request goes with a Content-Length, never chunked (some
#: servers and proxies refuse chunked uploads; dicomweb-client chunks above 1 MB)
_NO_CHUNKING = 2**40

#: PS3.18 Table 10.5.3-2 / PS3.4 Annex B failure reasons, for the stored error text
_FAILURE_NAMES = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xC122: "transfer syntax not supported",
}
_WARNING_NAMES = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}

#: Reason given for an object the answer names in neither sequence
NOT_ACKNOWLEDGED = -1

_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


class SecretError(ValueError):
    """The destination's secret cannot be read (file missing, variable unset, empty)."""


def failure_name(code: int) -> str:
    if code == NOT_ACKNOWLEDGED:
        return "not acknowledged (in neither ReferencedSOPSequence nor FailedSOPSequence)"
    if code in _FAILURE_NAMES:
        return f"0x{code:04X} {_FAILURE_NAMES[code]}"
    prefix = {0xA7: "out of resources", 0xA9: "data set does not match SOP class"}
    if code >> 8 in prefix:
        return f"0x{code:04X} {prefix[code >> 8]}"
    if code >> 12 == 0xC:
        return f"0x{code:04X} cannot understand"
    return f"0x{code:04X}"


def may_pass(code: int) -> bool:
    """Whether storing an object that failed with this reason may work on a later try."""
    return code in (NOT_ACKNOWLEDGED, 0x0110) or code >> 8 == 0xA7


def read_secret(auth: DicomWebAuth) -> str:
    """The password or token, from its file (first line) or environment variable."""
    if auth.secret_env:
        value = os.environ.get(auth.secret_env, "").strip()
        if not value:
            raise SecretError(f"auth.secret_env: environment variable {auth.secret_env} is unset")
    else:
        assert auth.secret_file is not None  # the model wants one of the two
        try:
            lines = auth.secret_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SecretError(
                f"auth.secret_file {auth.secret_file}: {exc.strerror or exc}"
            ) from None
        value = lines[0].strip() if lines else ""
        if not value:
            raise SecretError(f"auth.secret_file {auth.secret_file} is empty")
    register_secret(value)
    return value


def secret_file_readable_by_others(auth: DicomWebAuth) -> bool:
    path = auth.secret_file
    return path is not None and path.exists() and bool(path.stat().st_mode & stat.S_IROTH)


class _Session(requests.Session):
    """A session that sends what the destination says, whatever the environment holds.

    - `verify` (the destination's ca_file) goes with every request: requests lets
      REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace a session's `verify`, so a CA bundle in
      the service's environment would silently replace the configured `ca_file`.
    - requests' own Host header: dicomweb-client sets `Host` to the URL's host without its
      port, which makes servers that build URLs from it (Orthanc's RetrieveURL) and
      virtual hosts on a non-default port answer for the wrong origin.
    - No redirects: requests turns a POST answered by 301/302 into a GET, whose 200 would
      read as "stored"; a redirect is reported instead (the url should name the service).
    """

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        headers = kwargs.get("headers")
        if headers:
            kwargs["headers"] = {k: v for k, v in headers.items() if str(k).lower() != "host"}
        if kwargs.get("verify") is None:
            kwargs["verify"] = self.verify
        kwargs["allow_redirects"] = False
        return super().request(method, url, *args, **kwargs)


@dataclass(frozen=True)
class DicomWebPeer:
    """Where and how to send for one DICOMweb destination (the exporter's `Target`)."""

    url: str
    timeout_s: float = 30.0
    auth: DicomWebAuth | None = None
    verify_tls: bool = True
    ca_file: Path | None = None

    @classmethod
    def of(cls, dest: DicomWebDestination) -> DicomWebPeer:
        return cls(dest.url, dest.timeout_s, dest.auth, dest.verify_tls, dest.ca_file)

    def __str__(self) -> str:
        return self.url  # validated to hold no credentials

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def session(self) -> requests.Session:
        """A session with the credentials (read now) and the TLS settings; SecretError."""
        session = _Session()
        session.verify = str(self.ca_file) if self.ca_file is not None else self.verify_tls
        session.headers["Accept"] = "application/dicom+json"
        if self.auth is not None:
            secret = read_secret(self.auth)
            if self.auth.type == "basic":
                session.auth = (self.auth.username or "", secret)
            else:
                session.headers["Authorization"] = f"Bearer {secret}"
        return session

    # ------------------------------------------------------------------ Target

    def unreachable(self) -> str | None:
        return tcp_problem(self.host, self.port, self.timeout_s)

    def check(self) -> tuple[bool, str]:
        """QIDO-RS `GET {url}/studies?limit=1`: (ok, what happened), for `echo`."""
        what = f"QIDO-RS {self.url}/studies?limit=1"
        t0 = time.perf_counter()
        try:
            with self.session() as session:
                response = session.get(
                    f"{self.url}/studies", params={"limit": "1"}, timeout=self.timeout_s
                )
        except SecretError as exc:
            return False, f"{what}: {exc}"
        except requests.RequestException as exc:
            return False, f"{what}: {self._transport_problem(exc)}"
        ms = 1000 * (time.perf_counter() - t0)
        if response.status_code in (200, 204):
            return True, f"{what}: HTTP {response.status_code} ({ms:.0f} ms)"
        return (
            False,
            f"{what}: HTTP {response.status_code} {response.reason}{self._advice(response)}",
        )

    def send(self, files: Sequence[Path]) -> list[str]:
        """STOW-RS `files` in one request; raise `ExportError` unless every one was stored.

        Returns the SOP Instance UIDs stored.
        """
        datasets = [pydicom.dcmread(f) for f in files]
        names = {
            str(ds.SOPInstanceUID): _label(ds, path)
            for ds, path in zip(datasets, files, strict=True)
        }
        answers: list[requests.Response] = []

        def keep(response: requests.Response, *_args: Any, **_kwargs: Any) -> None:
            answers.append(response)

        try:
            session = self.session()
        except SecretError as exc:
            raise ExportError(
                f"STOW-RS to {self}: {exc}", permanent=True, hint=_AUTH_HINT
            ) from None
        with session:
            client = DICOMwebClient(
                self.url,
                session=session,
                callback=keep,
                chunk_size=_NO_CHUNKING,
                timeout=self.timeout_s,
            )
            # one request per attempt: its own retries (5 by default, on any exception)
            # would multiply the exporter's and hide the outcome of each
            client.set_http_retry_params(retry=False)
            try:
                client.store_instances(datasets)
            except requests.exceptions.SSLError as exc:
                raise ExportError(
                    f"STOW-RS to {self}: {self._transport_problem(exc)}",
                    permanent=True,
                    hint=_TLS_HINT,
                ) from None
            except requests.RequestException as exc:
                if not answers:  # no HTTP answer at all: refused, reset, timed out
                    raise ExportError(
                        f"STOW-RS to {self}: {self._transport_problem(exc)}"
                    ) from None
            except (ValueError, KeyError, AttributeError) as exc:
                # dicomweb-client could not read an answer (no or another Content-Type);
                # the answer itself is judged below
                if not answers:
                    raise
                logger.debug("dicomweb-client did not parse the STOW-RS answer: %s", exc)
        return self._judge(answers[-1], names)

    # ------------------------------------------------------------------ answers

    def _judge(self, response: requests.Response, names: dict[str, str]) -> list[str]:
        status = response.status_code
        head = f"HTTP {status} {response.reason}".rstrip()
        if status in (401, 403):
            raise ExportError(
                f"STOW-RS to {self}: {head}{self._advice(response)}",
                permanent=True,
                hint=_AUTH_HINT,
            )
        if status in (404, 405) or 300 <= status < 400:
            raise ExportError(
                f"STOW-RS to {self}: {head}{self._advice(response)}", permanent=True, hint=_URL_HINT
            )
        body = _answer(response)
        stored, failed, warned = _outcome(body, list(names))
        for uid, code in warned.items():
            name = _WARNING_NAMES.get(code, "warning")
            label = names.get(uid, uid)
            logger.warning("%s stored %s with warning 0x%04X %s", self, label, code, name)
        if 200 <= status < 300 and not failed:
            return stored
        if failed:
            lost = "; ".join(
                f"{names.get(uid, uid)}: {failure_name(c)}" for uid, c in failed.items()
            )
            detail = f"{len(failed)} of {len(names)} object(s) not stored: {lost}"
        else:
            detail = _text(response)
        if status >= 500 or (not failed and status in (408, 429)):
            retry = True
        elif status < 300:  # some stored, some not: retry when every reason may pass
            retry = all(may_pass(c) for c in failed.values())
        else:  # refused (400, 409, ...): only a full archive may take them later
            retry = bool(failed) and all(c >> 8 == 0xA7 for c in failed.values())
        if retry:
            raise ExportError(f"STOW-RS to {self}: {head}: {detail}".rstrip(": "))
        raise ExportError(
            f"{STOW_REFUSED} by {self}: {head}: {detail}".rstrip(": "),
            permanent=True,
            hint=_REFUSED_HINT,
        )

    def _advice(self, response: requests.Response) -> str:
        if response.status_code in (401, 403):
            if self.auth is None:
                return ": the server wants credentials; configure the destination's auth"
            source = (
                f"environment variable {self.auth.secret_env}"
                if self.auth.secret_env
                else f"file {self.auth.secret_file}"
            )
            who = f"user {self.auth.username!r}, " if self.auth.username else ""
            return (
                f": the server refused the node's {self.auth.type} credentials "
                f"({who}secret from {source})"
            )
        if response.status_code in (404, 405):
            return f": no DICOMweb service at {self.url} (check the destination's url)"
        if 300 <= response.status_code < 400:
            where = response.headers.get("Location", "?")
            return f": redirected to {where} (set the destination's url to the service itself)"
        return ""

    def _transport_problem(self, exc: requests.RequestException) -> str:
        """Why no HTTP answer came, in a few words (requests' own text is a page long)."""
        if isinstance(exc, requests.exceptions.SSLError):
            text = str(exc)
            for marker in (
                "certificate verify failed",
                "hostname mismatch",
                "wrong version number",
            ):
                if marker in text:
                    m = re.search(rf"{marker}[^'\")\]]*", text)
                    words = (m.group(0) if m else marker).split(" (_ssl.c")[0].strip()
                    return f"TLS: {words} ({self.host}:{self.port})"
            return f"TLS handshake failed ({self.host}:{self.port})"
        if isinstance(exc, requests.exceptions.Timeout):
            return f"no answer within {self.timeout_s:g} s ({self.host}:{self.port})"
        m = _ERRNO_TEXT.search(str(exc))
        if m:
            return f"{m.group(1).strip().lower()} ({self.host}:{self.port})"
        return f"{type(exc).__name__} ({self.host}:{self.port})"


_AUTH_HINT = (
    "; not retried: fix the destination's auth (username, the secret's file or variable); "
    "failed deliveries are queued again once QIDO-RS answers (export.recheck_failed_s), "
    "or at once with `ctmtl-node resend`"
)
_URL_HINT = (
    "; not retried: fix the destination's url, then reload the node (SIGHUP) or `ctmtl-node resend`"
)
_TLS_HINT = (
    "; not retried: fix the destination's ca_file (or the server's certificate), then "
    "reload the node (SIGHUP) or `ctmtl-node resend`"
)
_REFUSED_HINT = (
    "; not retried: the server refused these objects (see the reason); "
    "`ctmtl-node resend` sends them again"
)


def _label(ds: Dataset, path: Path) -> str:
    """How an object is named in a delivery's error: modality and UID (and the file name
    when it does not hold the UID already)."""
    what = f"{ds.get('Modality', '?')} {ds.SOPInstanceUID}"
    return what if str(ds.SOPInstanceUID) in path.name else f"{path.name} ({what})"


def _answer(response: requests.Response) -> Dataset | None:
    """The STOW-RS response data set (DICOM JSON, whatever the Content-Type says), if any."""
    if not response.content:
        return None
    try:
        payload = response.json()
    except ValueError:
        return None
    if isinstance(payload, list):  # some servers wrap the data set in an array
        payload = payload[0] if payload else {}
    if not isinstance(payload, dict):
        return None
    try:
        return Dataset.from_json(payload)
    except (ValueError, TypeError, KeyError):
        logger.debug("STOW-RS answer is JSON but not a DICOM JSON data set")
        return None


def _outcome(
    body: Dataset | None, sent: list[str]
) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """(stored UIDs, {failed UID: reason}, {UID stored with a warning: reason}).

    Without a response data set every object counts as stored (200 with an empty body);
    with one, an object in neither sequence is "not acknowledged".
    """
    if body is None or ("ReferencedSOPSequence" not in body and "FailedSOPSequence" not in body):
        return list(sent), {}, {}
    failed: dict[str, int] = {}
    for item in body.get("FailedSOPSequence") or []:
        reason = item.get("FailureReason")
        failed[str(item.get("ReferencedSOPInstanceUID", "?"))] = int(reason or 0x0110)
    acked: set[str] = set()
    warned: dict[str, int] = {}
    for item in body.get("ReferencedSOPSequence") or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        acked.add(uid)
        if item.get("WarningReason") is not None:
            warned[uid] = int(item.WarningReason)
    for uid in sent:
        if uid not in acked and uid not in failed:
            failed[uid] = NOT_ACKNOWLEDGED
    return [uid for uid in sent if uid in acked and uid not in failed], failed, warned


def _text(response: requests.Response) -> str:
    """The first words of a non-DICOM error body (HTML pages and JSON messages alike)."""
    text = re.sub(r"<[^>]+>", " ", response.text or "")
    return " ".join(text.split())[:200]
