"""Comprehensive 3D SR with a TID 1500 Measurement Report of one series' results (highdicom).

Content tree (under "Imaging Measurement Report", observer = the AI device whose Device
Observer UID is the checkpoint's ``device_uid``; procedure reported: CT of chest):

* TID 1501 group "COVID-19 classification": finding COVID-19 (SCT 840539006); qualitative
  evaluation COVID-19 = Present / Absent (SCT 52101004 / 272519000, at the threshold);
  measurement Probability (DCM 122157, no units, 0..1); algorithm identification;
* TID 1411 group "Lung lesions": Referenced Segment = SEG segment 1 with the source series
  (Source Series for Segmentation); finding Lesion, site Lung; measurements Volume (mL) and
  Percent of lung volume involved (private code, %);
* TID 1411 group "Lungs" referencing SEG segment 2 with the lung Volume (mL), or a TID 1501
  group when the SEG has no lung segment;
* "Qualitative Evaluations" container with the disclaimer as a TEXT Comment, so every SR
  viewer shows it with the numbers.

Verification Flag UNVERIFIED, Preliminary Flag PRELIMINARY, Completion Flag COMPLETE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.headers import apply_character_set, result_character_set
from dicom_node.results import (
    AlgorithmInfo,
    ResultOptions,
    contributing_equipment,
    quiet_source_warnings,
    result_texts,
    write_atomically,
)
from dicom_node.seg import LESION_SEGMENT, LUNG_SEGMENT, LUNG_TYPE
from dicom_node.volume import CTVolume

logger = logging.getLogger(__name__)

CC = hd.sr.CodedConcept
LOCAL_SCHEME = "99CTMTL"
COVID19 = CC("840539006", "SCT", "COVID-19")
PROBABILITY = CC("122157", "DCM", "Probability")
PERCENT_LUNG_INVOLVED = CC("LUNGINV", LOCAL_SCHEME, "Percent of lung volume involved")
CT_CHEST = CC("169069000", "SCT", "CT of chest")
QUALITATIVE_EVALUATIONS = CC("C0034375", "UMLS", "Qualitative Evaluations")
MILLILITER = CC("ml", "UCUM", "milliliter")
NO_UNITS = CC("1", "UCUM", "no units")
PERCENT = CC("%", "UCUM", "Percent")


@dataclass(frozen=True)
class ResultNumbers:
    """The figures one series' SR reports (rounded as stored)."""

    covid_probability: float
    covid_present: bool
    lesion_volume_ml: float
    lung_volume_ml: float
    lung_involvement_percent: float


def _algorithm_id(
    algorithm: AlgorithmInfo, options: ResultOptions
) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name[:64],
        version=algorithm.model_version[:64],
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=options.manufacturer,
    )


def _tracking(label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=str(generate_uid()), identifier=label)


def build_sr(
    volume: CTVolume,
    seg: hd.seg.Segmentation,
    numbers: ResultNumbers,
    options: ResultOptions,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``numbers``, referencing ``seg`` and the source series."""
    algo = _algorithm_id(algorithm, options)
    source_series = hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid)
    segment_numbers = {int(s.SegmentNumber) for s in seg.SegmentSequence}

    classification = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking("COVID-19 classification"),
        finding_type=COVID19,
        algorithm_id=algo,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=COVID19,
                value=codes.SCT.Present if numbers.covid_present else codes.SCT.Absent,
            )
        ],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=numbers.covid_probability, unit=NO_UNITS)
        ],
    )

    def segment_ref(number: int) -> hd.sr.ReferencedSegment:
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=source_series,
        )

    lesions = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking("Lung lesions"),
        referenced_segment=segment_ref(LESION_SEGMENT),
        finding_type=codes.SCT.Lesion,
        finding_sites=[hd.sr.FindingSite(LUNG_TYPE)],
        algorithm_id=algo,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=numbers.lesion_volume_ml, unit=MILLILITER
            ),
            hd.sr.Measurement(
                name=PERCENT_LUNG_INVOLVED, value=numbers.lung_involvement_percent, unit=PERCENT
            ),
        ],
    )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [classification, lesions]
    lung_volume = hd.sr.Measurement(
        name=codes.SCT.Volume, value=numbers.lung_volume_ml, unit=MILLILITER
    )
    if LUNG_SEGMENT in segment_numbers:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking("Lungs"),
                referenced_segment=segment_ref(LUNG_SEGMENT),
                finding_type=LUNG_TYPE,
                algorithm_id=algo,
                measurements=[lung_volume],
            )
        )
    else:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking("Lungs"),
                finding_type=LUNG_TYPE,
                algorithm_id=algo,
                measurements=[lung_volume],
            )
        )

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name[:64],
            manufacturer_name=options.manufacturer,
            model_name=options.model_name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_CHEST,
        imaging_measurements=groups,
    )
    disclaimer = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    disclaimer.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=options.disclaimer,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    report[0].ContentSequence.append(disclaimer)

    with quiet_source_warnings():
        sr = _document(
            volume,
            seg,
            report,
            options,
            algorithm,
            series_instance_uid,
            sop_instance_uid,
            instance_number,
        )
    charset = result_character_set(volume.datasets[0], result_texts(options, algorithm))
    apply_character_set(sr, charset)
    logger.debug(
        "SR %s: COVID-19 p=%.4f (%s), lesions %.2f mL = %.2f%% of %.2f mL lung",
        sop_instance_uid,
        numbers.covid_probability,
        "present" if numbers.covid_present else "absent",
        numbers.lesion_volume_ml,
        numbers.lung_involvement_percent,
        numbers.lung_volume_ml,
    )
    return sr


def _document(
    volume: CTVolume,
    seg: hd.seg.Segmentation,
    report: hd.sr.MeasurementReport,
    options: ResultOptions,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *volume.datasets],
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=options.series_number("sr", volume.datasets[0]),
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=options.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=options.institution_name,
        series_description=options.series_description("sr"),
        contributing_equipment=contributing_equipment(options, algorithm),
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name="ctmtl local codes",
                responsible_organization=options.manufacturer,
            )
        ],
        # set afterwards (dicom_node.headers): highdicom refuses some valid values
        specific_character_set=None,
    )


def write_sr(sr: hd.sr.Comprehensive3DSR, out_dir: Path) -> Path:
    """Write atomically as ``SR_<SOPInstanceUID>.dcm`` and return the path."""
    return write_atomically(sr, out_dir, "SR")
