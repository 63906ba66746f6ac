"""DICOM Segmentation (BINARY) of the lesions, and optionally the lungs, with highdicom.

Segment 1 is always "Lesion" (SCT 52988006, category Morphologically Abnormal Structure,
anatomic region Lung) and segment 2, when written, "Lung" (SCT 39607008, category
Anatomical Structure); both AUTOMATIC with the algorithm's name and version. Frames share
the source Frame of Reference and reference the source images (highdicom fills the
Referenced Series Sequence and per-frame derivation references).

Empty frames (``ResultOptions.empty_frames``) default to "keep": one frame per source
slice and segment. Several PACS viewers map SEG frames to slices by index or need every
slice present, and a series without lesions then still gives a valid SEG whose lesion
segment is empty. Binary frames are 1 bit per pixel, so this costs ~32 KB per 512x512
slice and segment. "omit" writes only frames with segmented pixels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.headers import apply_character_set, result_character_set
from dicom_node.results import (
    AlgorithmInfo,
    ResultOptions,
    algorithm_identification,
    contributing_equipment,
    quiet_source_warnings,
    result_texts,
    software_versions,
    write_atomically,
)
from dicom_node.volume import CTVolume

logger = logging.getLogger(__name__)

LESION_SEGMENT = 1
LUNG_SEGMENT = 2
LESION_TYPE = codes.SCT.Lesion  # 52988006
LUNG_TYPE = hd.sr.CodedConcept("39607008", "SCT", "Lung")
LESION_COLOR = (255, 64, 32)
LUNG_COLOR = (64, 160, 255)
Concept = Code | hd.sr.CodedConcept  # a code from pydicom's dictionary or a highdicom one


def segment_descriptions(
    algorithm: AlgorithmInfo, include_lung: bool
) -> list[hd.seg.SegmentDescription]:
    algo = algorithm_identification(algorithm)

    def segment(
        number: int,
        label: str,
        category: Concept,
        kind: Concept,
        color: tuple[int, int, int],
        regions: list[Concept] | None = None,
    ) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            anatomic_regions=regions,
            display_color=hd.color.CIELabColor.from_rgb(*color),
        )

    segments = [
        segment(
            LESION_SEGMENT,
            "Lesion",
            codes.SCT.MorphologicallyAbnormalStructure,
            LESION_TYPE,
            LESION_COLOR,
            [LUNG_TYPE],
        )
    ]
    if include_lung:
        segments.append(
            segment(LUNG_SEGMENT, "Lung", codes.SCT.AnatomicalStructure, LUNG_TYPE, LUNG_COLOR)
        )
    return segments


def build_seg(
    volume: CTVolume,
    lesion: np.ndarray,
    lung: np.ndarray | None,
    options: ResultOptions,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int = 1,
) -> hd.seg.Segmentation:
    """The SEG of ``lesion`` (and ``lung`` when given), boolean (Z, Y, X) in volume order."""
    if lesion.shape != volume.shape:
        raise ValueError(f"lesion mask shape {lesion.shape} != volume shape {volume.shape}")
    if lung is not None and lung.shape != volume.shape:
        raise ValueError(f"lung mask shape {lung.shape} != volume shape {volume.shape}")
    layers = [lesion] if lung is None else [lesion, lung]
    # (Z, Y, X, segments) as a view of a segment-major array: highdicom's overlap check
    # sums over the segment axis, several times faster in this memory layout
    stacked = np.empty((len(layers), *lesion.shape), dtype=np.uint8)
    for out, m in zip(stacked, layers, strict=True):
        out[...] = np.asarray(m, dtype=bool).view(np.uint8)  # a plain copy, no cast
    stacked = volume.source_order(stacked.transpose(1, 2, 3, 0))
    source = volume.datasets[0]
    with quiet_source_warnings():
        seg = _segmentation(
            volume,
            stacked,
            lung is not None,
            options,
            algorithm,
            source,
            series_instance_uid,
            sop_instance_uid,
            instance_number,
        )
    apply_character_set(seg, result_character_set(source, result_texts(options, algorithm)))
    logger.debug(
        "SEG %s: %d frames, %d segment(s), lesion voxels %d",
        sop_instance_uid,
        int(seg.NumberOfFrames),
        len(layers),
        int(np.count_nonzero(lesion)),
    )
    return seg


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with a cheaper segment-overlap check for our one case.

    For a 4-D uint8 stack highdicom sums over the segment axis in int64 to see whether
    segments overlap: 1.6 of 3.8 s of a 255-slice SEG with the lung segment. The same test
    in uint8 (two segments cannot sum past 255) gives the same answer. Any other input, or
    a highdicom whose private hook has another signature, takes highdicom's own path.
    """

    @classmethod
    def _check_and_cast_pixel_array(
        cls, pixel_array: Any, segment_numbers: Any, segmentation_type: Any, dtype: Any
    ) -> Any:
        fast = (
            isinstance(pixel_array, np.ndarray)
            and pixel_array.ndim == 4
            and pixel_array.dtype == np.uint8
            and 1 < pixel_array.shape[-1] == len(segment_numbers) < 256
            and segmentation_type == hd.seg.SegmentationTypeValues.BINARY
        )
        if not fast or int(pixel_array.max()) > 1:  # highdicom raises its own error
            return super()._check_and_cast_pixel_array(
                pixel_array, segment_numbers, segmentation_type, dtype
            )
        overlap = bool((pixel_array.sum(axis=-1, dtype=np.uint8) > 1).any())
        values = hd.seg.SegmentsOverlapValues
        return pixel_array, values.YES if overlap else values.NO


def _segmentation(
    volume: CTVolume,
    stacked: np.ndarray,
    include_lung: bool,
    options: ResultOptions,
    algorithm: AlgorithmInfo,
    source: Dataset,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
) -> hd.seg.Segmentation:
    return _Segmentation(
        source_images=volume.datasets,
        pixel_array=stacked,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(algorithm, include_lung),
        series_instance_uid=series_instance_uid,
        series_number=options.series_number("seg", source),
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=options.manufacturer,
        manufacturer_model_name=options.model_name,
        software_versions=software_versions(algorithm),  # type: ignore[arg-type]
        device_serial_number=algorithm.device_uid[-16:],
        content_description=f"AI lesion segmentation - {options.series_disclaimer}"[:64],
        content_label="AI_LESIONS",
        series_description=options.series_description("seg"),
        institution_name=options.institution_name,
        omit_empty_frames=options.empty_frames == "omit",
        contributing_equipment=contributing_equipment(options, algorithm),
        # set afterwards (dicom_node.headers): highdicom refuses some valid values
        specific_character_set=None,
    )


def write_seg(seg: hd.seg.Segmentation, out_dir: Path) -> Path:
    """Write atomically as ``SEG_<SOPInstanceUID>.dcm`` and return the path."""
    return write_atomically(seg, out_dir, "SEG")
