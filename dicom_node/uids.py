"""What makes a UID usable by the node: present, at most 64 characters, digits and dots.

One definition for the spool (UIDs become path parts), the C-STORE checks and the series
checks before inference (results must reference the source instances by these UIDs, so a
series with a UUID string or an empty UID cannot get a SEG or SR).
"""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: the UIDs every source CT instance must carry for results to reference it
REFERENCED_UIDS = (
    ("SOPInstanceUID", "SOP Instance UID"),
    ("SeriesInstanceUID", "Series Instance UID"),
    ("StudyInstanceUID", "Study Instance UID"),
    ("FrameOfReferenceUID", "Frame of Reference UID"),
)


def uid_problem(value: object) -> str | None:
    """Why `value` is not a usable UID ('missing', 'empty', ...), or None when it is."""
    if value is None:
        return "missing"
    uid = str(value).strip().rstrip("\x00").strip()
    if not uid:
        return "empty"
    if len(uid) > 64:
        return "longer than 64 characters"
    if not _UID_RE.match(uid):
        return "not a valid UID (only digits and dots)"
    return None


def clean_uid(value: object) -> str:
    """The UID without padding (call after `uid_problem` returned None)."""
    return str(value).strip().rstrip("\x00").strip()
