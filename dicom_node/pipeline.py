"""One series in, SEG + SR (+ optional overlay SC) out: load -> lung mask -> network -> DICOM.

``process_series`` is what the worker runs per job and what ``ctmtl-node process`` runs
(through :func:`run_process_command`); :func:`analyse_volume` is its part between the
loaded volume and the DICOM writers, which ``ctmtl-node evaluate`` runs unchanged on every
series it scores. The series-level COVID probability comes from the Predictor, which
aggregates the slice probabilities over the slices that contain lung (the rule is in
``mtl_model.predictor``). The lesion mask is ``probability >= threshold`` inside the lung
mask; volumes are voxel counts times the voxel volume. :func:`write_results` is the seam
after inference (given masks and a probability), used by tests to check that a known
lesion lands where drawn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.headers import with_result_headers
from dicom_node.overlay import build_secondary_capture, write_secondary_capture
from dicom_node.results import AlgorithmInfo, ResultOptions, ResultUIDs
from dicom_node.seg import build_seg, write_seg
from dicom_node.sr import ResultNumbers, build_sr, write_sr
from dicom_node.volume import CTVolume, SeriesRejected, decode_workers, load_series
from mtl_model.lung import lung_mask

logger = logging.getLogger(__name__)

#: below this the lung mask found no lungs worth reporting (not a chest CT, or no air)
MIN_LUNG_VOLUME_ML = 100.0


@dataclass
class SeriesResult:
    """What one processed series produced (the figures are those written into the SR)."""

    series_instance_uid: str
    covid_probability: float
    covid_present: bool
    lesion_volume_ml: float
    lung_volume_ml: float
    lung_involvement_percent: float
    seg_path: Path
    sr_path: Path
    seg_sop_instance_uid: str
    sr_sop_instance_uid: str
    model_version: str
    device_uid: str
    covid_threshold: float = 0.5
    extra_paths: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    #: per source slice, patient order (see :meth:`SeriesAnalysis.slice_figures`)
    slices: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``ctmtl-node process`` JSON line (DESIGN.md contract), paths as strings."""
        out = asdict(self)
        out["seg_path"] = str(self.seg_path)
        out["sr_path"] = str(self.sr_path)
        out["extra_paths"] = [str(p) for p in self.extra_paths]
        return out


def result_numbers(
    voxel_ml: float,
    lesion: np.ndarray,
    lung: np.ndarray,
    covid_probability: float,
    covid_threshold: float,
) -> ResultNumbers:
    """Volumes and percentages, rounded as they are stored in the SR."""
    lesion_ml = float(np.count_nonzero(lesion)) * voxel_ml
    lung_ml = float(np.count_nonzero(lung)) * voxel_ml
    percent = 100.0 * lesion_ml / lung_ml if lung_ml > 0 else 0.0
    probability = round(float(covid_probability), 4)
    return ResultNumbers(
        covid_probability=probability,
        covid_present=probability >= covid_threshold,
        lesion_volume_ml=round(lesion_ml, 2),
        lung_volume_ml=round(lung_ml, 2),
        lung_involvement_percent=round(percent, 2),
    )


def write_results(
    volume: CTVolume,
    lesion: np.ndarray,
    lung: np.ndarray,
    covid_probability: float,
    out_dir: str | Path,
    options: ResultOptions,
    algorithm: AlgorithmInfo,
    covid_threshold: float = 0.5,
    uids: ResultUIDs | None = None,
    instance_number: int = 1,
    timings: dict[str, float] | None = None,
) -> SeriesResult:
    """Build and write SEG, SR (and SC when configured) for given masks; the seam after AI.

    The results are built from :func:`dicom_node.headers.with_result_headers` of the source
    headers (a no-op when :func:`process_series` already repaired them).
    """
    volume = with_result_headers(volume)
    out = Path(out_dir)
    uids = uids or ResultUIDs()
    timings = dict(timings or {})
    lesion = np.asarray(lesion, dtype=bool) & np.asarray(lung, dtype=bool)
    numbers = result_numbers(
        volume.voxel_volume_ml, lesion, lung, covid_probability, covid_threshold
    )

    t0 = time.perf_counter()
    seg = build_seg(
        volume,
        lesion,
        lung if options.include_lung_segment else None,
        options,
        algorithm,
        uids.seg_series,
        uids.seg_instance,
        instance_number,
    )
    seg_path = write_seg(seg, out)
    t1 = time.perf_counter()
    sr = build_sr(
        volume, seg, numbers, options, algorithm, uids.sr_series, uids.sr_instance, instance_number
    )
    sr_path = write_sr(sr, out)
    t2 = time.perf_counter()
    timings["seg"] = t1 - t0
    timings["sr"] = t2 - t1
    extra: list[Path] = []
    if options.secondary_capture:
        images = build_secondary_capture(volume, lesion, lung, options, algorithm, uids.sc_series)
        extra = write_secondary_capture(images, out)
        timings["secondary_capture"] = time.perf_counter() - t2
    return SeriesResult(
        series_instance_uid=volume.series_instance_uid,
        covid_probability=numbers.covid_probability,
        covid_present=numbers.covid_present,
        lesion_volume_ml=numbers.lesion_volume_ml,
        lung_volume_ml=numbers.lung_volume_ml,
        lung_involvement_percent=numbers.lung_involvement_percent,
        seg_path=seg_path,
        sr_path=sr_path,
        seg_sop_instance_uid=uids.seg_instance,
        sr_sop_instance_uid=uids.sr_instance,
        model_version=algorithm.model_version,
        device_uid=algorithm.device_uid,
        covid_threshold=covid_threshold,
        extra_paths=extra,
        timings={k: round(v, 4) for k, v in timings.items()},
    )


@dataclass
class SeriesAnalysis:
    """What the lung mask and the network found in one volume, before any DICOM is written."""

    lung: np.ndarray  # (Z, Y, X) bool
    lesion: np.ndarray  # (Z, Y, X) bool: lesion probability >= threshold, inside the lung
    slice_covid_probability: np.ndarray  # (Z,) per slice, patient order
    in_lung: np.ndarray  # (Z,) bool: the slice has lung, so it counts for the series figure
    covid_probability: float  # the Predictor's series figure
    covid_threshold: float
    voxel_volume_ml: float
    timings: dict[str, float] = field(default_factory=dict)

    def numbers(self) -> ResultNumbers:
        """The series figures rounded as the SR stores them (:func:`result_numbers`)."""
        return result_numbers(
            self.voxel_volume_ml,
            self.lesion,
            self.lung,
            self.covid_probability,
            self.covid_threshold,
        )

    def slice_figures(
        self, sop_instance_uids: Sequence[str], z_mm: Sequence[float]
    ) -> list[dict[str, Any]]:
        """One dict per slice: ``sop_instance_uid``, ``z_mm``, ``covid_probability``,
        ``lesion_ml``, ``in_lung``; the series figure is the Predictor's aggregation of
        ``covid_probability`` over the slices with ``in_lung``."""
        n = len(self.in_lung)
        if len(sop_instance_uids) != n or len(z_mm) != n:
            raise ValueError(f"{n} slices, {len(sop_instance_uids)} UIDs, {len(z_mm)} positions")
        lesion_ml = self.lesion.reshape(n, -1).sum(axis=1) * self.voxel_volume_ml
        return [
            {
                "sop_instance_uid": str(sop_instance_uids[k]),
                "z_mm": round(float(z_mm[k]), 3),
                "covid_probability": round(float(self.slice_covid_probability[k]), 4),
                "lesion_ml": round(float(lesion_ml[k]), 3),
                "in_lung": bool(self.in_lung[k]),
            }
            for k in range(n)
        ]


def analyse_volume(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    predictor: Any,
    options: ResultOptions | None = None,
) -> SeriesAnalysis:
    """Lung mask, the network and the thresholds on one (Z, Y, X) HU volume.

    Raises ``SeriesRejected`` when the lung mask finds no lungs (before the network runs).
    ``predictor`` is an ``mtl_model.Predictor`` with segmentation and classification heads.
    """
    options = options or ResultOptions()
    t0 = time.perf_counter()
    lung = lung_mask(hu, spacing)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    lung_ml = float(np.count_nonzero(lung)) * voxel_ml
    t1 = time.perf_counter()
    if lung_ml < MIN_LUNG_VOLUME_ML:
        raise SeriesRejected(
            f"no lungs found (lung mask {lung_ml:.0f} mL < {MIN_LUNG_VOLUME_ML:.0f} mL); "
            "not a chest CT?"
        )
    in_lung = np.asarray(lung.any(axis=(1, 2)))
    default_threshold = float(predictor.metadata.labels.threshold)
    lesion_threshold = options.lesion_threshold or default_threshold
    prediction = predictor.predict_hu(
        hu, slice_mask=in_lung, lung_mask=lung, lesion_threshold=lesion_threshold
    )
    t2 = time.perf_counter()
    if (
        prediction.lesion_mask is None
        or prediction.slice_covid_probability is None
        or prediction.series_covid_probability is None
    ):
        raise ValueError(
            "the model needs both a segmentation and a classification head for the node"
        )
    return SeriesAnalysis(
        lung=lung,
        lesion=prediction.lesion_mask & lung,
        slice_covid_probability=np.asarray(prediction.slice_covid_probability),
        in_lung=in_lung,
        covid_probability=float(prediction.series_covid_probability),
        covid_threshold=options.covid_threshold or default_threshold,
        voxel_volume_ml=voxel_ml,
        timings={"lung_mask": t1 - t0, "inference": t2 - t1},
    )


def slice_positions(volume: CTVolume) -> tuple[list[str], list[float]]:
    """SOP Instance UID and position along the slice normal (mm) of each sorted slice."""
    z_mm = [float(z) for z in volume.positions @ volume.direction[:, 2]]
    if volume.is_multiframe:
        uids = [str(volume.datasets[0].SOPInstanceUID)] * len(z_mm)
    else:
        uids = [str(ds.get("SOPInstanceUID", "")) for ds in volume.datasets]
    return uids, z_mm


def process_series(
    files: Sequence[str | Path | pydicom.Dataset],
    out_dir: str | Path,
    predictor: Any,
    options: ResultOptions | None = None,
    uids: ResultUIDs | None = None,
    instance_number: int = 1,
    decode_workers: int | Executor = 0,
    after_stage: Callable[[str], None] | None = None,
) -> SeriesResult:
    """Run the whole pipeline on one series' files; ``SeriesRejected`` if it cannot be used.

    ``predictor`` is an ``mtl_model.Predictor`` whose model has segmentation and
    classification heads. ``decode_workers`` (processes, or an executor to reuse)
    decodes compressed slices in parallel. ``after_stage`` is called with ``"load"``
    once the volume is loaded and with ``"inference"`` once the network ran (before any
    result is written); an exception it raises stops the pipeline there (the worker
    checks its job lease this way).
    """
    options = options or ResultOptions()
    t0 = time.perf_counter()
    volume = load_series(files, workers=decode_workers)
    # before the network runs: what highdicom needs of the source headers (Type 2
    # attributes present, malformed demographics emptied), so no inference is wasted
    volume = with_result_headers(volume)
    load_s = time.perf_counter() - t0
    if after_stage is not None:
        after_stage("load")
    analysis = analyse_volume(volume.hu, volume.spacing, predictor, options)
    if after_stage is not None:
        after_stage("inference")
    result = write_results(
        volume,
        analysis.lesion,
        analysis.lung,
        analysis.covid_probability,
        out_dir,
        options,
        AlgorithmInfo.from_metadata(predictor.metadata),
        covid_threshold=analysis.covid_threshold,
        uids=uids,
        instance_number=instance_number,
        timings={"load": load_s, **analysis.timings},
    )
    result.slices = analysis.slice_figures(*slice_positions(volume))
    logger.debug(
        "series %s: COVID-19 p=%.3f, lesions %.1f mL (%.2f%% of %.0f mL lung); timings %s",
        result.series_instance_uid,
        result.covid_probability,
        result.lesion_volume_ml,
        result.lung_involvement_percent,
        result.lung_volume_ml,
        result.timings,
    )
    return result


def series_files(series_dir: str | Path) -> list[Path]:
    """The DICOM files under ``series_dir`` (recursively); other files are skipped."""
    root = Path(series_dir)
    if not root.is_dir():
        raise SeriesRejected(f"{root} is not a folder")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        try:
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            logger.warning("skipping %s: not a DICOM file", path)
            continue
        files.append(path)
    if not files:
        raise SeriesRejected(f"no DICOM files in {root}")
    return files


def run_process_command(
    series_dir: str | Path,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    options: ResultOptions | None = None,
) -> dict[str, Any]:
    """``ctmtl-node process``: one series folder -> SEG + SR in ``out_dir`` -> the JSON dict.

    Raises ``SeriesRejected`` (reason in ``.reason``) for a series that cannot be used and
    ``mtl_model.CheckpointError`` for an unusable checkpoint.
    """
    from mtl_model import Predictor

    files = series_files(series_dir)
    t0 = time.perf_counter()
    predictor = Predictor(checkpoint=checkpoint, device=device)
    model_load = time.perf_counter() - t0
    workers = decode_workers(-1, persistent=False)
    result = process_series(files, out_dir, predictor, options, decode_workers=workers)
    out = result.to_json()
    out["timings"] = {"model_load": round(model_load, 4), **out["timings"]}
    return out
