"""Keeping demographics out of error texts: one scrub function for what the worker stores.

An exception raised while a series is processed may quote a value of its headers (highdicom
and pydicom quote the value they cannot parse: ``Unable to convert '1961-07-04' to 'DA'
object``). The worker stores such texts in ``job.error`` and ``series.reason`` (shown by
``ctmtl-node status``) and logs them, so every error text goes through :func:`scrub`
first, with the identifying values of the series' own headers (:func:`identifying_values`).

A value is removed wherever it appears, case-insensitively: the whole value, and for person
names each component group (``=``) and component (``^``), for dates the ``YYYYMMDD`` and
``YYYY-MM-DD`` forms of each other, and the escaped bytes as stored (a ``bytes`` repr).
Values and parts shorter than :data:`MIN_LENGTH` characters (two for non-ASCII text,
where two ideographs are a name) are left: a Patient's Sex ``F`` or a Study ID ``1`` removed
everywhere would garble every message, and they identify nobody.

Secrets (passwords) are ``dicom_node.redact``'s concern; this module knows patient data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

REDACTED = "<redacted>"
MIN_LENGTH = 3

#: attributes whose values identify a patient (or lead to one); removed from error texts
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)
#: value representations whose values pydicom validates by pattern on conversion, logging
#: a malformed value: these are read as stored bytes (ASCII by definition)
_ASCII_VRS = frozenset({"DA", "TM", "DT", "CS", "AS"})
_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")


def _element_texts(ds: Dataset, keyword: str) -> list[str]:
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return []
    raw = ds.get_item(tag)
    texts: list[str] = []
    stored = raw.value if isinstance(raw, RawDataElement) else None
    if isinstance(stored, bytes) and stored:
        text = stored.decode("ascii", errors="backslashreplace")
        texts.append(text.strip(" \x00"))
        texts.append(repr(stored.rstrip(b" \x00"))[2:-1])  # as a bytes repr quotes it
        if (raw.VR or dictionary_VR(tag)) in _ASCII_VRS:
            return texts
    try:
        value = ds[tag].value
    except Exception:  # undecodable: the stored forms above are what an error can quote
        return texts
    values = value if isinstance(value, list | tuple) else [value]
    texts.extend(str(v) for v in values if v is not None)
    return texts


def _variants(text: str) -> set[str]:
    """The forms of one value an error text may show."""
    text = text.strip()
    out = {text, text.replace("\\", "\\\\")}
    for part in text.split("\\"):
        out.add(part)
        for group in part.split("="):
            out.add(group)
            out.update(group.split("^"))
            out.add(" ".join(c for c in group.split("^") if c))
        date = _DATE.fullmatch(part)
        if date is not None:
            y, m, d = date.groups()
            out.update({f"{y}{m}{d}", f"{y}-{m}-{d}", f"{y}.{m}.{d}"})
            out.add(f"{int(y)}, {int(m)}, {int(d)}")  # as datetime.date(...) shows it
    return {v.strip() for v in out if v.strip()}


def identifying_values(sources: Iterable[str | Path | Dataset]) -> set[str]:
    """The identifying values (:data:`IDENTIFYING`) of the series' headers, in every form
    :func:`scrub` removes. Files that cannot be read are skipped; never raises."""
    values: set[str] = set()
    tags = [t for t in (tag_for_keyword(k) for k in (*IDENTIFYING, "SpecificCharacterSet")) if t]
    seen: set[tuple[str, ...]] = set()
    for source in sources:
        try:
            if isinstance(source, Dataset):
                ds = source
            else:
                ds = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=tags)
            texts = tuple(t for kw in IDENTIFYING for t in _element_texts(ds, kw))
        except Exception as exc:  # any unreadable file: the others still count
            logger.debug("cannot read identifying values of a source (%s)", type(exc).__name__)
            continue
        if texts in seen:
            continue
        seen.add(texts)
        for text in texts:
            values.update(_variants(text))
    return values


def _pattern(values: Iterable[str]) -> re.Pattern[str] | None:
    kept = [v for v in values if len(v) >= (MIN_LENGTH if v.isascii() else 2)]
    if not kept:
        return None
    # longest first: a whole name goes before its components
    alternatives = [re.escape(v) for v in sorted(kept, key=len, reverse=True)]
    return re.compile("|".join(alternatives), re.IGNORECASE)


def scrub(text: str, values: Iterable[str]) -> str:
    """``text`` (an error message or traceback) with every identifying value replaced.

    ``values`` as :func:`identifying_values` gives them (plain strings work too: each is
    removed with its person-name and date forms).
    """
    if not text:
        return text
    expanded: set[str] = set()
    for value in values:
        expanded.update(_variants(value))
    pattern = _pattern(expanded)
    if pattern is None:
        return text
    return pattern.sub(REDACTED, text)
