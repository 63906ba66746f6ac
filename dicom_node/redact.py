"""Keeping secrets out of what the node prints and logs: one masking function.

`mask_secrets(text)` is used wherever a configuration, a URL or an error message is shown
(`config check`, start-up errors, `db upgrade`, `/readyz`, every log line through
`MaskingFormatter`). It hides

- the password of any URL in the text (`scheme://user:PASSWORD@host` -> `user:***@host`,
  also when the password itself holds an unescaped `@`),
- `password=...` / `passwd=` / `pwd=` parameters (URL query strings, libpq DSNs),
- every secret registered with `register_secret` (the database password of the loaded
  configuration, TLS key passwords read from the environment), in plain and URL-escaped
  form, so that a driver's error text that quotes one is masked too.

Why not only `sqlalchemy.engine.make_url(...).render_as_string(hide_password=True)`: it
handles a well-formed URL only (`user:p@ss@host` leaks `ss`), and not a password quoted in
an exception text.
"""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import quote, quote_plus

logger = logging.getLogger(__name__)

MASK = "***"

#: Secrets shorter than this are masked only where they appear as a URL password: a
#: one- or two-letter "secret" replaced everywhere would garble every message.
MIN_SECRET_LENGTH = 4

_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"<>]*):(?P<password>[^\s'\"<>]*)@"
)
_PARAM_PASSWORD = re.compile(
    r"(?i)\b(?P<key>password|passwd|pwd)(?P<eq>\s*=\s*)(?P<value>[^&\s'\",;]+)"
)

_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask `value` (and its URL-escaped forms) in everything `mask_secrets` sees from now on."""
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        _secrets.update({value, quote(value, safe=""), quote_plus(value, safe="")})


def mask_secrets(text: str) -> str:
    """`text` with URL passwords, password parameters and registered secrets replaced."""
    if not text:
        return text
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)  # longest first: no partial leftovers
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    return _PARAM_PASSWORD.sub(lambda m: f"{m.group('key')}{m.group('eq')}{MASK}", text)


def register_url_password(url: str | None) -> None:
    """Register the password of a database URL (nothing when it has none or does not parse)."""
    if not url:
        return
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:  # a malformed URL: the regular expressions still mask it
        logger.debug("database URL does not parse; its password is masked by pattern only")
        return
    register_secret(None if password is None else str(password))


class MaskingFormatter(logging.Formatter):
    """A formatter whose every line (message and traceback) went through `mask_secrets`."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))
