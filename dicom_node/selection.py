"""Selection rules: which received series the node processes, kept as config data.

The rules look at headers only (no pixel data), so a PACS that routes too much (scouts,
MR, thin reformats, abdomen) costs a header read and a stored reason, never a model run.
A series is judged as a whole: one instance that breaks a rule rejects the series, with a
reason that names the rule, because a volume mixing e.g. a localizer with axial slices
cannot be processed safely anyway.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"

#: Header tags that selection (and completion's geometry checks) read; the rest of the
#: header is skipped when the spool files are read (`specific_tags`).
SELECTION_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "Modality",
    "ImageType",
    "SliceThickness",
    "BodyPartExamined",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "ImageOrientationPatient",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
)


class SelectionRules(BaseModel):
    """The `[selection]` config section. Every rule can be switched off."""

    model_config = ConfigDict(extra="forbid")

    modalities: list[str] = Field(
        default_factory=lambda: ["CT"], description="accepted Modality (0008,0060) values"
    )
    sop_classes: list[str] = Field(
        default_factory=lambda: [
            CT_IMAGE_STORAGE,
            ENHANCED_CT_IMAGE_STORAGE,
            LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
        ],
        description="accepted SOP Class UIDs",
    )
    require_original: bool = Field(True, description="Image Type value 1 must be ORIGINAL")
    excluded_image_types: list[str] = Field(
        default_factory=lambda: ["LOCALIZER", "SCOUT", "TOPOGRAM", "PROJECTION IMAGE", "MIP"],
        description="any of these in Image Type rejects the series",
    )
    require_axial: bool = Field(True, description="slices must be axial (see max_tilt_deg)")
    max_tilt_deg: float = Field(
        20.0, ge=0, le=90, description="largest angle between the slice normal and the z axis"
    )
    min_slice_thickness_mm: float | None = Field(0.5, ge=0)
    max_slice_thickness_mm: float | None = Field(8.0, ge=0)
    allow_missing_slice_thickness: bool = True
    min_slices: int = Field(20, ge=1, description="fewer slices (or frames) rejects the series")
    body_part_patterns: list[str] = Field(
        default_factory=lambda: [r"CHEST", r"THORAX", r"THORAC", r"LUNG", r"PULM"],
        description="regular expressions (case-insensitive); one must match a checked tag",
    )
    body_part_tags: list[str] = Field(
        default_factory=lambda: [
            "BodyPartExamined",
            "SeriesDescription",
            "StudyDescription",
            "ProtocolName",
        ],
        description="tags that the body part patterns are matched against",
    )
    allow_missing_body_part: bool = Field(
        True, description="accept a series where none of body_part_tags has a value"
    )

    @field_validator("body_part_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from exc
        return value

    @field_validator("modalities", "excluded_image_types")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [v.strip().upper() for v in value]

    @model_validator(mode="after")
    def _range(self) -> SelectionRules:
        lo, hi = self.min_slice_thickness_mm, self.max_slice_thickness_mm
        if lo is not None and hi is not None and lo > hi:
            raise ValueError("min_slice_thickness_mm is larger than max_slice_thickness_mm")
        return self


@dataclass
class SelectionDecision:
    """Outcome of the rules for one series; `reasons` is empty when accepted."""

    accepted: bool
    reasons: list[str] = field(default_factory=list)
    n_slices: int = 0

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _text(ds: Dataset, keyword: str) -> str:
    value: Any = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _image_type(ds: Dataset) -> list[str]:
    value: Any = ds.get("ImageType")
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip().upper() for v in value.split("\\")]
    return [str(v).strip().upper() for v in value]


def _shared_item(ds: Dataset, sequence: str) -> Dataset | None:
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared:
        return None
    item = shared[0].get(sequence)
    return item[0] if item else None


def _thickness(ds: Dataset) -> float | None:
    value = ds.get("SliceThickness")
    if value is None or value == "":
        measures = _shared_item(ds, "PixelMeasuresSequence")
        value = measures.get("SliceThickness") if measures is not None else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _orientation(ds: Dataset) -> list[float] | None:
    value = ds.get("ImageOrientationPatient")
    if not value:
        plane = _shared_item(ds, "PlaneOrientationSequence")
        value = plane.get("ImageOrientationPatient") if plane is not None else None
    if not value or len(value) != 6:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _tilt_deg(orientation: Sequence[float]) -> float:
    """Angle between the slice normal and the patient z axis."""
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm == 0:
        return 90.0
    return math.degrees(math.acos(min(1.0, abs(n[2]) / norm)))


def count_slices(headers: Sequence[Dataset]) -> int:
    """Slices of the series: instances, or frames of multi-frame (Enhanced CT) instances."""
    total = 0
    for ds in headers:
        frames = ds.get("NumberOfFrames")
        try:
            total += int(frames) if frames not in (None, "") else 1
        except (TypeError, ValueError):
            total += 1
    return total


def evaluate(headers: Sequence[Dataset], rules: SelectionRules) -> SelectionDecision:
    """Apply the rules to the headers of one series; every broken rule gives a reason."""
    reasons: list[str] = []
    if not headers:
        return SelectionDecision(False, ["series has no instances"])

    def add(reason: str) -> None:
        if reason not in reasons:
            reasons.append(reason)

    patterns = [re.compile(p, re.IGNORECASE) for p in rules.body_part_patterns]
    body_values: set[str] = set()
    for ds in headers:
        sop_class = str(ds.get("SOPClassUID", ""))
        if rules.sop_classes and sop_class not in rules.sop_classes:
            add(f"SOP class {sop_class or '(missing)'} is not accepted")
        modality = _text(ds, "Modality").upper()
        if rules.modalities and modality not in rules.modalities:
            add(f"modality {modality or '(missing)'} is not one of {rules.modalities}")
        image_type = _image_type(ds)
        if rules.require_original and (not image_type or image_type[0] != "ORIGINAL"):
            shown_type = "\\".join(image_type) or "(missing)"
            add(f"image type {shown_type} is not ORIGINAL")
        excluded = sorted(set(image_type) & set(rules.excluded_image_types))
        if excluded:
            add(f"image type contains {', '.join(excluded)}")
        if rules.require_axial:
            orientation = _orientation(ds)
            if orientation is None:
                add("image orientation is missing")
            elif (tilt := _tilt_deg(orientation)) > rules.max_tilt_deg:
                add(f"slices are not axial (tilt {tilt:.0f} deg > {rules.max_tilt_deg:g})")
        thickness = _thickness(ds)
        if thickness is None:
            if not rules.allow_missing_slice_thickness:
                add("slice thickness is missing")
        else:
            lo, hi = rules.min_slice_thickness_mm, rules.max_slice_thickness_mm
            if (lo is not None and thickness < lo) or (hi is not None and thickness > hi):
                add(f"slice thickness {thickness:g} mm is outside [{lo}, {hi}] mm")
        for keyword in rules.body_part_tags:
            text = _text(ds, keyword)
            if text:
                body_values.add(text)

    if patterns:
        if body_values:
            if not any(p.search(v) for p in patterns for v in body_values):
                shown = ", ".join(sorted(body_values))
                add(f"body part / descriptions ({shown}) do not indicate a chest CT")
        elif not rules.allow_missing_body_part:
            add("body part and descriptions are missing")

    n_slices = count_slices(headers)
    if n_slices < rules.min_slices:
        add(f"{n_slices} slices, fewer than the minimum {rules.min_slices}")
    return SelectionDecision(not reasons, reasons, n_slices)
