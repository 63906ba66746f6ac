"""Optional Secondary Capture series with the lesion overlay burned in (highdicom).

For viewers that cannot display DICOM SEG: one RGB image per selected slice, the CT in a
lung window with the lesions tinted red, the lung outline in blue and the short disclaimer
written into the pixels. Off by default (``ResultOptions.secondary_capture``); the images
are RLE compressed (lossless, the overlay compresses well).
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.uid import RLELossless, generate_uid

from dicom_node.headers import apply_character_set, result_character_set
from dicom_node.results import (
    AlgorithmInfo,
    ResultOptions,
    contributing_equipment,
    quiet_source_warnings,
    result_texts,
    write_atomically,
)
from dicom_node.volume import CTVolume

logger = logging.getLogger(__name__)

LESION_RGB = np.array([255, 40, 40], dtype=np.float32)
LUNG_RGB = np.array([60, 150, 255], dtype=np.uint8)
ALPHA = 0.45


def _letter(vector: np.ndarray) -> str:
    """Patient Orientation letters of a direction (dominant axes, LPS convention)."""
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(vector))
    out = ""
    for axis in order:
        if abs(vector[axis]) < 0.25 and out:
            break
        out += names[axis][0] if vector[axis] > 0 else names[axis][1]
    return out[:3]


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = (
        mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    )
    return mask & ~inner


def render_slice(
    hu: np.ndarray, lesion: np.ndarray, lung: np.ndarray | None, options: ResultOptions
) -> np.ndarray:
    """One (Y, X, 3) uint8 image: windowed CT, tinted lesions, lung outline, disclaimer."""
    low = options.sc_window_center - options.sc_window_width / 2
    gray = np.clip((hu - low) / options.sc_window_width * 255.0, 0, 255).astype(np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[lesion] = (1 - ALPHA) * rgb[lesion] + ALPHA * LESION_RGB
    out = rgb.round().astype(np.uint8)
    if lung is not None:
        out[_outline(lung)] = LUNG_RGB
    image = Image.fromarray(out)
    ImageDraw.Draw(image).text((4, 4), options.series_disclaimer, fill=(255, 255, 0))
    return np.asarray(image)


def build_secondary_capture(
    volume: CTVolume,
    lesion: np.ndarray,
    lung: np.ndarray | None,
    options: ResultOptions,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
) -> list[hd.sc.SCImage]:
    """SC images of the slices chosen by ``options.sc_slices`` ("lesion" or "all")."""
    if options.sc_slices == "all":
        slices = list(range(volume.shape[0]))
    else:
        slices = [int(k) for k in np.flatnonzero(lesion.any(axis=(1, 2)))]
    row, col = volume.orientation[:3], volume.orientation[3:]
    orientation = (_letter(row), _letter(col))
    charset = result_character_set(volume.datasets[0], result_texts(options, algorithm))
    images = []
    for number, k in enumerate(slices, start=1):
        ref = volume.datasets[k] if not volume.is_multiframe else volume.datasets[0]
        pixels = render_slice(volume.hu[k], lesion[k], None if lung is None else lung[k], options)
        with quiet_source_warnings():
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=ref,
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=series_instance_uid,
                series_number=options.series_number("sc", volume.datasets[0]),
                sop_instance_uid=str(generate_uid()),
                instance_number=number,
                manufacturer=options.manufacturer,
                pixel_spacing=(volume.spacing[1], volume.spacing[2]),  # type: ignore[arg-type]
                patient_orientation=orientation,
                transfer_syntax_uid=RLELossless,
                contributing_equipment=contributing_equipment(options, algorithm),
                series_description=options.series_description("sc"),
                # set below (dicom_node.headers): highdicom refuses some valid values
                specific_character_set=None,
            )
        apply_character_set(sc, charset)
        sc.BurnedInAnnotation = "YES"
        # the chest is not a paired body part, so General Series Laterality stays absent
        sc.BodyPartExamined = str(ref.get("BodyPartExamined", "") or "CHEST")
        sc.ImageComments = options.disclaimer
        sc.DerivationDescription = f"Lesion overlay on slice {k + 1} of {volume.shape[0]}"
        images.append(sc)
    logger.debug("secondary capture: %d image(s)", len(images))
    return images


def write_secondary_capture(images: list[hd.sc.SCImage], out_dir: Path) -> list[Path]:
    """Write each atomically as ``SC_<SOPInstanceUID>.dcm``; return the paths."""
    return [write_atomically(sc, out_dir, "SC") for sc in images]
