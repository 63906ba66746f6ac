"""SEG + SR (+ overlay SC) written from known masks: placement, references, conventions."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydantic
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from dicom_node.pipeline import SeriesResult, write_results
from dicom_node.results import AlgorithmInfo, ResultOptions
from dicom_node.seg import LESION_SEGMENT, LUNG_SEGMENT
from dicom_node.sr import COVID19, PERCENT_LUNG_INVOLVED, PROBABILITY
from dicom_node.volume import CTVolume, load_series
from helpers import legacy_multiframe
from mtl_model.lung import lung_mask

ALGORITHM = AlgorithmInfo(
    name="ctmtl test network", model_version="1.2.3", device_uid="2.25.4242", software_version="0.1"
)


@pytest.fixture(scope="module")
def volume(noncovid_files: list[Path]) -> CTVolume:
    return load_series(noncovid_files)


@pytest.fixture(scope="module")
def lungs(volume: CTVolume) -> np.ndarray:
    return lung_mask(volume.hu, volume.spacing)


def drawn_lesion(lungs: np.ndarray, z: slice, size: int = 30) -> np.ndarray:
    """A hand-drawn box "lesion" around a lung pixel of the middle slice, cut to the lung."""
    lesion = np.zeros_like(lungs)
    zmid = (z.start + z.stop) // 2
    ys, xs = np.nonzero(lungs[zmid])
    cy, cx = int(ys[len(ys) // 3]), int(xs[len(xs) // 3])
    lesion[z, cy - size // 2 : cy + size // 2, cx - size // 2 : cx + size // 2] = True
    lesion &= lungs
    assert lesion[zmid].sum() > 100
    return lesion


def read_sr_numbers(sr: hd.sr.Comprehensive3DSR) -> dict:
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    out: dict = {}
    for group in report.get_image_measurement_groups():
        tracking = group.tracking_identifier
        for m in group.get_measurements():
            out[(tracking, m.name.meaning)] = (m.value, m.unit.value)
        for q in group.get_qualitative_evaluations():
            if q.name == COVID19:
                out[(tracking, "COVID-19")] = q.value
    for group in report.get_volumetric_roi_measurement_groups():
        tracking = group.tracking_identifier
        for m in group.get_measurements():
            out[(tracking, m.name.meaning)] = (m.value, m.unit.value)
        ref = group.referenced_segment
        out[(tracking, "segment")] = (
            ref.referenced_sop_instance_uid,
            ref.referenced_segment_numbers,
            ref.source_series_for_segmentation.value,
        )
    return out


@pytest.fixture(scope="module")
def drawn_result(
    volume: CTVolume, lungs: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SeriesResult, np.ndarray]:
    lesion = drawn_lesion(lungs, slice(12, 16))
    out = tmp_path_factory.mktemp("drawn")
    result = write_results(
        volume, lesion, lungs, 0.8123, out, ResultOptions(), ALGORITHM, covid_threshold=0.5
    )
    return result, lesion


def test_drawn_lesion_lands_on_the_right_slices_and_pixels(drawn_result, volume) -> None:
    result, lesion = drawn_result
    seg = hd.seg.segread(result.seg_path)
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[LESION_SEGMENT])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), lesion)
    assert set(np.flatnonzero(pixels[..., 0].any(axis=(1, 2)))) == {12, 13, 14, 15}
    # default empty-frame policy "keep": every slice has a frame for every segment
    assert int(seg.NumberOfFrames) == 2 * volume.shape[0]


def test_seg_geometry_and_pixels_through_dcmqi(
    drawn_result, volume, lungs, dcmqi_seg_to_itk, tmp_path
) -> None:
    result, lesion = drawn_result
    images = dcmqi_seg_to_itk(result.seg_path, tmp_path / "dcmqi")
    assert len(images) == 2
    for image, expected in zip(images, (lesion, lungs), strict=True):
        itk = sitk.ReadImage(str(image))
        assert itk.GetSize() == (volume.shape[2], volume.shape[1], volume.shape[0])
        assert np.allclose(itk.GetOrigin(), volume.origin, atol=1e-3)
        assert np.allclose(
            itk.GetSpacing(), (volume.spacing[2], volume.spacing[1], volume.spacing[0]), atol=1e-4
        )
        assert np.allclose(np.array(itk.GetDirection()).reshape(3, 3), volume.direction, atol=1e-5)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(itk) > 0, expected)


def test_seg_and_sr_pass_dciodvfy(drawn_result, dciodvfy_errors) -> None:
    result, _ = drawn_result
    assert dciodvfy_errors(result.seg_path) == []
    assert dciodvfy_errors(result.sr_path) == []


def test_dciodvfy_check_catches_a_broken_seg(drawn_result, dciodvfy_errors, tmp_path) -> None:
    result, _ = drawn_result
    ds = pydicom.dcmread(result.seg_path)
    del ds.SegmentSequence[0].SegmentLabel
    ds.save_as(tmp_path / "broken.dcm")
    assert any("SegmentLabel" in e for e in dciodvfy_errors(tmp_path / "broken.dcm"))


def test_seg_conventions(drawn_result, volume) -> None:
    result, _ = drawn_result
    seg = pydicom.dcmread(result.seg_path)
    src = volume.datasets[0]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.SegmentsOverlap == "YES"  # the lesion lies inside the lung segment
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.PatientID == src.PatientID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == volume.shape[0]
    assert seg.SeriesNumber == 10000 + int(src.SeriesNumber)
    assert seg.SeriesDescription == "AI COVID-19 lesion SEG - NOT FOR DIAGNOSTIC USE"
    lesion, lung = seg.SegmentSequence
    assert (lesion.SegmentNumber, lung.SegmentNumber) == (LESION_SEGMENT, LUNG_SEGMENT)
    t = lesion.SegmentedPropertyTypeCodeSequence[0]
    assert (t.CodeValue, t.CodingSchemeDesignator) == ("52988006", "SCT")
    t = lung.SegmentedPropertyTypeCodeSequence[0]
    assert (t.CodeValue, t.CodingSchemeDesignator) == ("39607008", "SCT")
    for s in seg.SegmentSequence:
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        assert s.SegmentAlgorithmName == ALGORITHM.name
        assert s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "1.2.3"
    ours = [e for e in seg.ContributingEquipmentSequence if e.get("DeviceUID")]
    assert len(ours) == 1
    assert ours[0].DeviceUID == "2.25.4242"
    assert ours[0].Manufacturer == "ctmtl project"
    assert ours[0].ManufacturerModelName == "ctmtl COVID-19 CT MTL"
    assert "model 1.2.3" in list(ours[0].SoftwareVersions)


def test_sr_numbers_references_and_flags(drawn_result, volume, lungs) -> None:
    result, lesion = drawn_result
    voxel_ml = volume.voxel_volume_ml
    assert result.lesion_volume_ml == pytest.approx(lesion.sum() * voxel_ml, abs=0.01)
    assert result.lung_volume_ml == pytest.approx(lungs.sum() * voxel_ml, abs=0.01)
    assert result.lung_involvement_percent == pytest.approx(
        100 * lesion.sum() / lungs.sum(), abs=0.01
    )
    sr = hd.sr.srread(result.sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesNumber == 20000 + int(volume.datasets[0].SeriesNumber)
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    numbers = read_sr_numbers(sr)
    assert numbers[("COVID-19 classification", PROBABILITY.meaning)] == (0.8123, "1")
    assert numbers[("COVID-19 classification", "COVID-19")] == codes.SCT.Present
    assert numbers[("Lung lesions", "Volume")] == (result.lesion_volume_ml, "ml")
    assert numbers[("Lung lesions", PERCENT_LUNG_INVOLVED.meaning)] == (
        result.lung_involvement_percent,
        "%",
    )
    assert numbers[("Lungs", "Volume")] == (result.lung_volume_ml, "ml")
    seg = pydicom.dcmread(result.seg_path, stop_before_pixels=True)
    assert numbers[("Lung lesions", "segment")] == (
        seg.SOPInstanceUID,
        [LESION_SEGMENT],
        volume.series_instance_uid,
    )
    assert numbers[("Lungs", "segment")][1] == [LUNG_SEGMENT]
    # the SEG and every source image are listed as evidence
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert {ds.SOPInstanceUID for ds in volume.datasets} <= evidence
    # the disclaimer is in the content tree, where SR viewers show it
    texts = [
        item.TextValue
        for item in _walk(sr.ContentSequence)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert texts == [ResultOptions().disclaimer]
    ours = [e for e in sr.ContributingEquipmentSequence if e.get("DeviceUID")]
    assert ours[0].DeviceUID == "2.25.4242"


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def test_patient_study_accession_and_charset_are_kept(
    volume, lungs, tmp_path, dciodvfy_errors
) -> None:
    datasets = [copy.deepcopy(ds) for ds in volume.datasets]
    for ds in datasets:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.AccessionNumber = "ACC-0042"
        ds.PatientName = "Müller^Jürgen"
        ds.StudyID = "S1"
    doctored = copy.copy(volume)
    doctored.datasets = datasets
    options = ResultOptions(include_lung_segment=False, series_disclaimer="RESEARCH ONLY")
    result = write_results(doctored, np.zeros_like(lungs), lungs, 0.2, tmp_path, options, ALGORITHM)
    for path in (result.seg_path, result.sr_path):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.AccessionNumber == "ACC-0042"
        assert str(ds.PatientName) == "Müller^Jürgen"
        assert ds.StudyInstanceUID == volume.study_instance_uid
        assert ds.SeriesDescription.endswith(" - RESEARCH ONLY")
        assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(result.seg_path, stop_before_pixels=True)
    assert len(seg.SegmentSequence) == 1  # no lung segment
    numbers = read_sr_numbers(hd.sr.srread(result.sr_path))
    assert numbers[("COVID-19 classification", "COVID-19")] == codes.SCT.Absent
    assert numbers[("Lung lesions", "Volume")] == (0.0, "ml")
    assert numbers[("Lungs", "Volume")] == (result.lung_volume_ml, "ml")  # TID 1501 group


def test_omit_empty_frames(volume, lungs, tmp_path) -> None:
    lesion = drawn_lesion(lungs, slice(20, 22))
    options = ResultOptions(empty_frames="omit", include_lung_segment=False)
    result = write_results(volume, lesion, lungs, 0.6, tmp_path / "a", options, ALGORITHM)
    seg = hd.seg.segread(result.seg_path)
    assert int(seg.NumberOfFrames) == 2
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), lesion)
    # nothing to segment at all: highdicom then keeps the (empty) frames, still valid
    empty = write_results(
        volume, np.zeros_like(lungs), lungs, 0.1, tmp_path / "b", options, ALGORITHM
    )
    assert int(pydicom.dcmread(empty.seg_path).NumberOfFrames) == volume.shape[0]


def test_seg_from_multiframe_source(
    volume, lungs, tmp_path, dcmqi_seg_to_itk, dciodvfy_errors
) -> None:
    mf = legacy_multiframe(volume.files, seed=5, series_number=7)
    path = tmp_path / "mf.dcm"
    mf.save_as(path, enforce_file_format=True)
    mvol = load_series([path])
    lesion = drawn_lesion(lungs, slice(5, 8))
    result = write_results(mvol, lesion, lungs, 0.7, tmp_path / "out", ResultOptions(), ALGORITHM)
    assert dciodvfy_errors(result.seg_path) == []
    itk = sitk.ReadImage(str(dcmqi_seg_to_itk(result.seg_path, tmp_path / "dq")[0]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk) > 0, lesion)
    assert np.allclose(itk.GetOrigin(), volume.origin, atol=1e-3)


def test_secondary_capture_overlay(volume, lungs, tmp_path, dciodvfy_errors) -> None:
    lesion = drawn_lesion(lungs, slice(14, 17))
    options = ResultOptions(secondary_capture=True)
    result = write_results(volume, lesion, lungs, 0.9, tmp_path, options, ALGORITHM)
    assert len(result.extra_paths) == 3  # one image per slice with lesion
    images = sorted(
        (pydicom.dcmread(p) for p in result.extra_paths), key=lambda d: int(d.InstanceNumber)
    )
    assert dciodvfy_errors(result.extra_paths[0]) == []
    for k, sc in zip(range(14, 17), images, strict=True):
        assert sc.BurnedInAnnotation == "YES"
        assert sc.SeriesNumber == 30000 + int(volume.datasets[0].SeriesNumber)
        assert sc.StudyInstanceUID == volume.study_instance_uid
        rgb = sc.pixel_array.astype(int)
        reddish = (rgb[..., 0] - rgb[..., 2]) > 60
        inside = reddish[lesion[k]].mean()
        outside = reddish[~lesion[k] & ~lungs[k]].mean()
        assert inside > 0.9 and outside < 0.01


def test_result_options_validation() -> None:
    with pytest.raises(pydantic.ValidationError, match="64"):
        ResultOptions(seg_series_description="x" * 60)
    with pytest.raises(pydantic.ValidationError):
        ResultOptions(empty_frames="sometimes")
    with pytest.raises(pydantic.ValidationError):
        ResultOptions(unknown_key=1)
    opts = ResultOptions(series_disclaimer="")
    assert opts.series_description("sr") == "AI COVID-19 report"


def test_segments_overlap_is_highdicoms_answer(lungs) -> None:
    """The SEG's cheaper overlap check (dicom_node.seg._Segmentation) says what
    highdicom's own check says: YES with lesions inside the lung, NO when none overlap,
    and a non-binary stack still gets highdicom's error."""
    from dicom_node.seg import _Segmentation

    lesion = drawn_lesion(lungs, slice(12, 16)).astype(np.uint8)
    outside = np.zeros_like(lesion)
    outside[:, :4, :4] = 1  # a corner of air: no lung there
    binary = hd.seg.SegmentationTypeValues.BINARY
    numbers = np.array([1, 2])
    for first, expect in ((lesion, "YES"), (outside, "NO")):
        stack = np.stack([first, lungs.astype(np.uint8)], axis=-1)
        ours = _Segmentation._check_and_cast_pixel_array(stack, numbers, binary, np.uint8)
        theirs = hd.seg.Segmentation._check_and_cast_pixel_array(stack, numbers, binary, np.uint8)
        assert ours[1] == theirs[1] == hd.seg.SegmentsOverlapValues[expect]
        assert ours[0] is stack
    with pytest.raises(ValueError, match="must be binary"):
        _Segmentation._check_and_cast_pixel_array(
            np.stack([lesion * 2, lesion], axis=-1), numbers, binary, np.uint8
        )
