"""What the node's result objects look like: the ``[results]`` config section and shared parts.

Conventions (../shared/DESIGN.md, "DICOM conventions for results"):

* results stay in the source Patient and Study (highdicom copies Patient and Study
  attributes and Accession Number from the source headers, which ``dicom_node.headers``
  repairs first; the Specific Character Set is the source's, see
  ``dicom_node.headers.result_character_set``) and each object kind gets its own new series;
* Series Numbers are deterministic: ``offset + source Series Number`` (source number 0 when
  absent), so results of series 3 are 10003 (SEG), 20003 (SR), 30003 (overlay SC);
* Series Descriptions are ``"<description> - <series_disclaimer>"``, always carrying the
  short "not for diagnostic use" tag where a reader sees it in a series list;
* IHE AI Results: the Contributing Equipment Sequence gets an item for the algorithm
  (manufacturer, model name, software versions = package + model version, Device UID =
  the checkpoint's ``device_uid``, which changes with every retrained checkpoint).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import highdicom as hd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

logger = logging.getLogger(__name__)

LO_MAX = 64  # DICOM LO value length: Series Description, Manufacturer, ...

DEFAULT_DISCLAIMER = (
    "Produced automatically by ctmtl, research software that is not a cleared or approved "
    "medical device. Not verified by a physician; not for diagnostic use. A qualified "
    "radiologist must review the images themselves."
)


class ResultOptions(BaseModel):
    """The ``[results]`` section of the node config: how SEG, SR and overlay series look."""

    model_config = ConfigDict(extra="forbid")

    manufacturer: str = Field("ctmtl project", max_length=LO_MAX)
    model_name: str = Field("ctmtl COVID-19 CT MTL", max_length=LO_MAX)
    institution_name: str | None = Field(None, max_length=LO_MAX)

    seg_series_number_offset: int = Field(10000, ge=0, le=2**30)
    sr_series_number_offset: int = Field(20000, ge=0, le=2**30)
    sc_series_number_offset: int = Field(30000, ge=0, le=2**30)
    seg_series_description: str = "AI COVID-19 lesion SEG"
    sr_series_description: str = "AI COVID-19 report"
    sc_series_description: str = "AI COVID-19 overlay"
    series_disclaimer: str = "NOT FOR DIAGNOSTIC USE"
    disclaimer: str = Field(DEFAULT_DISCLAIMER, min_length=1, max_length=1024)

    include_lung_segment: bool = True
    #: "keep": one frame per source slice and segment, also when empty (every viewer maps
    #: frame i to slice i, a lesion-free series still gives a SEG with its empty segment);
    #: "omit": only frames with segmented pixels (smaller files; viewers must place frames
    #: by position, which current OHIF, Slicer and dcmqi do)
    empty_frames: Literal["keep", "omit"] = "keep"
    #: probability threshold for the lesion mask and for COVID-19 present/absent;
    #: None = the checkpoint's ``labels.threshold``
    lesion_threshold: float | None = Field(None, gt=0, lt=1)
    covid_threshold: float | None = Field(None, gt=0, lt=1)

    #: burned-in overlay secondary capture series, for viewers without SEG support
    secondary_capture: bool = False
    sc_slices: Literal["lesion", "all"] = "lesion"
    sc_window_center: float = -600.0
    sc_window_width: float = Field(1500.0, gt=0)

    @model_validator(mode="after")
    def _descriptions_fit(self) -> ResultOptions:
        for name in ("seg", "sr", "sc"):
            text = self.series_description(name)
            if len(text) > LO_MAX:
                raise ValueError(
                    f"{name} series description {text!r} is {len(text)} characters; DICOM "
                    f"allows {LO_MAX} (shorten {name}_series_description or series_disclaimer)"
                )
        return self

    def series_description(self, kind: Literal["seg", "sr", "sc"]) -> str:
        base = getattr(self, f"{kind}_series_description")
        return f"{base} - {self.series_disclaimer}" if self.series_disclaimer else base

    def series_number(self, kind: Literal["seg", "sr", "sc"], source: Dataset) -> int:
        offset = int(getattr(self, f"{kind}_series_number_offset"))
        try:
            number = int(source.get("SeriesNumber") or 0)
        except (TypeError, ValueError):
            number = 0
        return offset + max(0, number)


@dataclass
class ResultUIDs:
    """Series and instance UIDs of one run's results (fresh by default)."""

    seg_series: str = field(default_factory=lambda: str(generate_uid()))
    sr_series: str = field(default_factory=lambda: str(generate_uid()))
    sc_series: str = field(default_factory=lambda: str(generate_uid()))
    seg_instance: str = field(default_factory=lambda: str(generate_uid()))
    sr_instance: str = field(default_factory=lambda: str(generate_uid()))


@dataclass(frozen=True)
class AlgorithmInfo:
    """Who made the result: the network (from checkpoint metadata) and this software."""

    name: str
    model_version: str
    device_uid: str
    software_version: str

    @property
    def version(self) -> str:
        return self.model_version

    @classmethod
    def from_metadata(cls, metadata: object) -> AlgorithmInfo:
        """From ``mtl_model.CheckpointMetadata`` (model_name, model_version, device_uid)."""
        return cls(
            name=str(getattr(metadata, "model_name", "ctmtl")),
            model_version=str(getattr(metadata, "model_version", "0")),
            device_uid=str(metadata.device_uid),  # type: ignore[attr-defined]
            software_version=package_version(),
        )


@contextlib.contextmanager
def quiet_source_warnings() -> Iterator[None]:
    """Silence highdicom's warning about single-component Patient Names in the source.

    The names come from the PACS as they are; results must copy them unchanged, so the
    warning (one per object) is noise in the node's log.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        yield


def package_version() -> str:
    try:
        return importlib.metadata.version("ctmtl")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def software_versions(algorithm: AlgorithmInfo) -> list[str]:
    return [
        f"ctmtl {algorithm.software_version}"[:LO_MAX],
        f"model {algorithm.model_version}"[:LO_MAX],
    ]


def result_texts(options: ResultOptions, algorithm: AlgorithmInfo) -> list[str]:
    """The texts results add to the source's values: their character set must hold them."""
    texts = [
        options.manufacturer,
        options.model_name,
        options.institution_name or "",
        options.series_disclaimer,
        options.disclaimer,
        algorithm.name,
        *software_versions(algorithm),
    ]
    texts += [options.series_description(kind) for kind in ("seg", "sr", "sc")]
    return texts


def contributing_equipment(
    options: ResultOptions, algorithm: AlgorithmInfo
) -> list[hd.ContributingEquipment]:
    """The IHE AI Results item naming the algorithm, its version and its Device UID."""
    item = hd.ContributingEquipment(
        manufacturer=options.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=options.model_name,
        software_versions=software_versions(algorithm),
        institution_name=options.institution_name,
        contribution_datetime=datetime.datetime.now(),
        contribution_description=f"AI algorithm: {algorithm.name}"[:1024],
    )
    item.DeviceUID = algorithm.device_uid
    return [item]


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:LO_MAX],
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.model_version[:LO_MAX],
        source=f"ctmtl {algorithm.software_version}"[:LO_MAX],
    )


def write_atomically(ds: Dataset, out_dir: Path, prefix: str) -> Path:
    """Write a result object as ``<prefix>_<SOPInstanceUID>.dcm`` (temp file, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{prefix}_{ds.SOPInstanceUID}.dcm"
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


def preload_result_tables() -> None:
    """Read highdicom's IOD tables now (about 0.6 s of JSON on a 2-core CPU), at start, not
    while the first series' SEG is built. Best effort: they are private helpers, cached
    by highdicom itself, and a highdicom without them just loads them later."""
    from highdicom import _standard_utils

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        load = getattr(_standard_utils, name, None)
        if callable(load):
            load()
