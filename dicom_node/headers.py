"""Source headers as the result writers hand them to highdicom, and the results' charset.

highdicom copies the Patient and General Study attributes of every result from a source
header (the SEG from the first source image, the SR from the SEG, an overlay image from
its slice), reads them as attributes (a missing one raises ``AttributeError``) and parses
some of them (``DA``/``TM`` dates and times, Patient's Sex as M/F/O). Real anonymised CT
often lacks Type 2 attributes, and some sources carry values that are not DICOM
(``1961-07-04`` for a date, ``male`` for the sex). :func:`result_headers` gives the headers
results are built from, checked and repaired before the network runs:

* Type 2 Patient / Study attributes missing in the source (:data:`TYPE2_PATIENT_STUDY`)
  are present and empty;
* values highdicom would parse that are not valid DICOM (:data:`PARSED`), and a Patient's
  Name with several values (highdicom accepts one), are dropped (empty, valid Type 2),
  never parsed into a failure;
* every other value (names, IDs, Accession Number) is copied as it is.

The checks read the stored bytes, not pydicom's converted values: pydicom's validation of
a malformed value logs that value (a demographic) on conversion. What was repaired is
logged by attribute keyword and instance count only, never by value.

:func:`result_character_set` is the Specific Character Set of the results: the source's,
in the form PS3.3 C.12.1.1.2 defines (an empty first value of a multi-valued set, the
PS3.5 Annex H form ``\\ISO 2022 IR 87``, is written ``ISO 2022 IR 6``), so names keep the
bytes the source has. highdicom 0.28 accepts only part of the valid values (it rejects the
empty first value and does not know ``ISO 2022 IR 149`` or ``ISO 2022 IR 58`` with code
extensions), so the writers build without one and set it afterwards
(:func:`apply_character_set`); highdicom does not encode text while building. A source
character set pydicom does not know, or one in which the texts results add (disclaimer,
descriptions, names of the algorithm) cannot be written, gives ``ISO_IR 192`` (UTF-8): the
text survives, not the bytes.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from pydicom import charset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.volume import CTVolume

logger = logging.getLogger(__name__)

#: Type 2 attributes of the Patient and General Study modules highdicom copies into results
TYPE2_PATIENT_STUDY: dict[str, str] = {
    "PatientName": "PN",
    "PatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyID": "SH",
    "AccessionNumber": "SH",
    "ReferringPhysicianName": "PN",
    "StudyDate": "DA",
    "StudyTime": "TM",
}
#: attributes highdicom parses; a value that is not valid DICOM is dropped
PARSED: dict[str, str] = {
    "PatientBirthDate": "DA",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "PatientSex": "CS",
}
PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})
UTF8 = "ISO_IR 192"
#: character sets of the default repertoire (pydicom maps them to Latin-1; results must be
#: ASCII in them)
DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})

_DA = re.compile(r"\d{8}")
_TM = re.compile(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?")

CharacterSet = str | list[str] | None


def stored_text(ds: Dataset, keyword: str) -> str | None:
    """The value of ``keyword`` as stored (None when absent), without pydicom's conversion.

    For the ASCII value representations of :data:`PARSED` (and other short texts): pydicom
    validates a value when it converts the stored bytes and logs a malformed one.
    """
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    elem = ds.get_item(tag)
    value = elem.value if isinstance(elem, DataElement | RawDataElement) else None
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip(" \x00")
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def valid_value(vr: str, keyword: str, text: str) -> bool:
    """Whether a stored value of :data:`PARSED` is valid DICOM that highdicom can parse."""
    if not text:
        return True
    if keyword == "PatientSex":
        return text in PATIENT_SEX_VALUES
    if vr == "DA":
        if _DA.fullmatch(text) is None:
            return False
        try:
            datetime.datetime.strptime(text, "%Y%m%d")
        except ValueError:
            return False
        return True
    if vr == "TM":
        return _TM.fullmatch(text) is not None
    return True


def _several_names(ds: Dataset) -> bool:
    """Patient's Name with more than one value (highdicom raises ``TypeError``), or one
    pydicom cannot convert. Converting a name logs no value (only lengths)."""
    try:
        name = ds.get("PatientName")
    except Exception:  # e.g. pydicom's reading validation set to raise
        return True
    return isinstance(name, MultiValue)


def header_problems(ds: Dataset) -> tuple[list[str], list[str]]:
    """(missing Type 2 keywords, keywords with a malformed value) of one source header."""
    missing = [kw for kw in TYPE2_PATIENT_STUDY if kw not in ds]
    malformed = []
    for keyword, vr in PARSED.items():
        text = stored_text(ds, keyword)
        if text is not None and not valid_value(vr, keyword, text):
            malformed.append(keyword)
    if "PatientName" not in missing and _several_names(ds):
        malformed.append("PatientName")
    return missing, malformed


def result_headers(datasets: Sequence[Dataset]) -> tuple[list[Dataset], list[str]]:
    """The source headers results are built from, and what was repaired (for the log).

    Headers that need no repair are returned as they are; the others as copies with the
    missing Type 2 attributes added empty and the malformed parsed values emptied. The
    notes name attributes and instance counts, never values.
    """
    out: list[Dataset] = []
    missing_count: Counter[str] = Counter()
    malformed_count: Counter[str] = Counter()
    for ds in datasets:
        missing, malformed = header_problems(ds)
        if not missing and not malformed:
            out.append(ds)
            continue
        fixed = copy.deepcopy(ds)
        for keyword in (*missing, *malformed):
            vr = TYPE2_PATIENT_STUDY[keyword]
            tag = tag_for_keyword(keyword)
            assert tag is not None
            fixed[tag] = DataElement(tag, vr, "")
        missing_count.update(missing)
        malformed_count.update(malformed)
        out.append(fixed)
    notes = []
    if missing_count:
        notes.append(
            "Type 2 attribute(s) missing, results carry them empty: "
            + ", ".join(f"{kw} ({n} instance(s))" for kw, n in missing_count.items())
        )
    if malformed_count:
        notes.append(
            "value(s) that are not valid DICOM, results carry them empty: "
            + ", ".join(f"{kw} ({n} instance(s))" for kw, n in malformed_count.items())
        )
    return out, notes


def with_result_headers(volume: CTVolume) -> CTVolume:
    """``volume`` with :func:`result_headers` (the same object when nothing needed repair).

    Idempotent and cheap on repaired headers; the pipeline calls it before inference.
    """
    datasets, notes = result_headers(volume.datasets)
    if not notes:
        return volume
    malformed = any(note.startswith("value(s)") for note in notes)
    logger.log(
        logging.WARNING if malformed else logging.INFO,
        "series %s: source headers: %s",
        volume.series_instance_uid,
        "; ".join(notes),
    )
    return dataclasses.replace(volume, datasets=datasets)


# --------------------------------------------------------------------- character set


def _source_values(source: Dataset) -> list[str]:
    value = source.get("SpecificCharacterSet")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else [str(v) for v in value]
    return [v.strip() for v in values]


def _codecs(values: Sequence[str]) -> list[str]:
    """Python codecs in which results must be writable (ASCII for the default repertoire)."""
    return [
        "ascii" if v in DEFAULT_REPERTOIRE else charset.python_encoding[v] for v in (values or [""])
    ]


def _writable(text: str, codecs: Sequence[str]) -> bool:
    """Every character of ``text`` is encodable in one of ``codecs`` (as pydicom's ISO 2022
    encoder does it, character by character)."""
    for ch in set(text):
        for codec in codecs:
            try:
                ch.encode(codec)
            except (UnicodeError, LookupError):
                continue
            break
        else:
            return False
    return True


def normalise_character_set(source: Dataset) -> CharacterSet:
    """The source's Specific Character Set in its PS3.3 form (None: default repertoire);
    ``ISO_IR 192`` when pydicom does not know a value."""
    values = _source_values(source)
    if not any(values):
        return None
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    if not all(v in charset.python_encoding for v in values):
        return UTF8
    return values[0] if len(values) == 1 else values


def result_character_set(source: Dataset, texts: Iterable[str] = ()) -> CharacterSet:
    """The Specific Character Set of the results of ``source``.

    The source's (:func:`normalise_character_set`), or ``ISO_IR 192`` when one of ``texts``
    (what the results add to the source's values) cannot be written in it.
    """
    value = normalise_character_set(source)
    if value == UTF8:
        return value
    values = [] if value is None else [value] if isinstance(value, str) else value
    codecs = _codecs(values)
    if not all(_writable(t, codecs) for t in texts if t):
        return UTF8
    return value


def apply_character_set(ds: Dataset, value: CharacterSet) -> None:
    """Set (or, for the default repertoire, remove) Specific Character Set of a result."""
    if value is None:
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = value
