"""process_series / run_process_command end to end on the real series with tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from dicom_node.pipeline import SeriesResult, process_series, run_process_command, series_files
from dicom_node.results import ResultOptions
from dicom_node.volume import SeriesRejected
from helpers import PROCESS_RESULT_KEYS, copy_files

STAGES = {"load", "lung_mask", "inference", "seg", "sr"}


def _sr_figures(path: Path) -> dict[str, float]:
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(path).content)
    out = {}
    for group in report.get_image_measurement_groups():
        for m in group.get_measurements():
            out[f"{group.tracking_identifier}/{m.name.meaning}"] = m.value
    for group in report.get_volumetric_roi_measurement_groups():
        for m in group.get_measurements():
            out[f"{group.tracking_identifier}/{m.name.meaning}"] = m.value
        out[f"{group.tracking_identifier}/segment"] = group.referenced_segment
    return out


@pytest.fixture(scope="module")
def covid_result(
    covid_files: list[Path], tiny_predictor, tmp_path_factory: pytest.TempPathFactory
) -> SeriesResult:
    return process_series(covid_files, tmp_path_factory.mktemp("covid"), tiny_predictor)


@pytest.mark.slow
def test_covid_series_results_validate_and_match(
    covid_result: SeriesResult, covid_files, dciodvfy_errors, dcmqi_seg_to_itk, tmp_path
) -> None:
    r = covid_result
    assert set(r.timings) == STAGES
    assert all(v >= 0 for v in r.timings.values())
    assert 2000 < r.lung_volume_ml < 8000
    assert 0 <= r.lesion_volume_ml <= r.lung_volume_ml
    assert 0 <= r.lung_involvement_percent <= 100
    assert 0 <= r.covid_probability <= 1
    assert dciodvfy_errors(r.seg_path) == []
    assert dciodvfy_errors(r.sr_path) == []

    # dcmqi reads the SEG, on the CT's grid
    ct = pydicom.dcmread(covid_files[0], stop_before_pixels=True)
    images = dcmqi_seg_to_itk(r.seg_path, tmp_path / "dcmqi")
    assert len(images) == 2
    lesion_itk, lung_itk = (sitk.ReadImage(str(p)) for p in images)
    for itk in (lesion_itk, lung_itk):
        assert itk.GetSize() == (512, 512, 255)
        assert np.allclose(itk.GetSpacing(), (0.703125, 0.703125, 1.25), atol=1e-4)
        assert np.allclose(itk.GetDirection(), np.eye(3).ravel(), atol=1e-6)
        x, y, _ = (float(v) for v in ct.ImagePositionPatient)
        assert np.allclose(itk.GetOrigin(), (x, y, -349.25), atol=1e-3)  # lowest slice
    lesion = sitk.GetArrayFromImage(lesion_itk) > 0
    lung = sitk.GetArrayFromImage(lung_itk) > 0
    assert not (lesion & ~lung).any()  # lesions only inside the lung mask
    voxel_ml = 1.25 * 0.703125**2 / 1000
    assert r.lesion_volume_ml == pytest.approx(lesion.sum() * voxel_ml, abs=0.01)
    assert r.lung_volume_ml == pytest.approx(lung.sum() * voxel_ml, abs=0.01)

    # highdicom reads both; the SR's numbers are the result's, and it references the SEG
    seg = hd.seg.segread(r.seg_path)
    assert seg.SOPInstanceUID == r.seg_sop_instance_uid
    figures = _sr_figures(r.sr_path)
    assert figures["COVID-19 classification/Probability"] == r.covid_probability
    assert figures["Lung lesions/Volume"] == r.lesion_volume_ml
    assert figures["Lung lesions/Percent of lung volume involved"] == r.lung_involvement_percent
    assert figures["Lungs/Volume"] == r.lung_volume_ml
    ref = figures["Lung lesions/segment"]
    assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert ref.referenced_segment_numbers == [1]
    assert ref.source_series_for_segmentation.value == ct.SeriesInstanceUID


@pytest.mark.slow
def test_lesions_are_thresholded_probability_inside_the_lungs(
    noncovid_files, constant_predictor_factory, tmp_path
) -> None:
    everywhere = constant_predictor_factory(10.0, 2.0)  # p(lesion) ~ 1, logit 2 for COVID
    r = process_series(noncovid_files, tmp_path / "all", everywhere)
    assert r.lesion_volume_ml == r.lung_volume_ml > 0  # clipped to the lung mask exactly
    assert r.lung_involvement_percent == 100.0
    assert r.covid_probability == round(1 / (1 + math.exp(-2.0)), 4)
    assert r.covid_present
    assert _sr_figures(r.sr_path)["COVID-19 classification/Probability"] == 0.8808

    nowhere = constant_predictor_factory(-10.0, -2.0)
    r = process_series(noncovid_files, tmp_path / "none", nowhere)
    assert r.lesion_volume_ml == 0.0 and r.lung_involvement_percent == 0.0
    assert r.covid_probability == 0.1192 and not r.covid_present
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(r.sr_path).content)
    (classification,) = report.get_image_measurement_groups()
    values = {q.name.meaning: q.value for q in classification.get_qualitative_evaluations()}
    assert values["COVID-19"] == codes.SCT.Absent
    seg = pydicom.dcmread(r.seg_path)
    assert int(seg.NumberOfFrames) == 2 * 30  # empty lesion frames kept (default policy)


def test_run_process_command_contract(noncovid_files, tiny_checkpoint, tmp_path) -> None:
    series = tmp_path / "series"
    copy_files(noncovid_files, series)
    (series / "README.txt").write_text("not DICOM")
    out = run_process_command(series, tmp_path / "out", tiny_checkpoint, "cpu")
    line = json.dumps(out)  # one JSON line, as the CLI prints it
    back = json.loads(line)
    for key in (*PROCESS_RESULT_KEYS, "lung_volume_ml", "timings"):
        assert key in back
    assert back["series_instance_uid"] == pydicom.dcmread(noncovid_files[0]).SeriesInstanceUID
    assert Path(back["seg_path"]).is_file() and Path(back["sr_path"]).is_file()
    assert STAGES | {"model_load"} == set(back["timings"])
    assert sorted(p.name[:3] for p in (tmp_path / "out").iterdir()) == ["SEG", "SR_"]


def test_series_without_lungs_or_not_ct_is_rejected(
    noncovid_files, tiny_predictor, tmp_path
) -> None:
    phantom = tmp_path / "phantom"
    phantom.mkdir()
    for f in noncovid_files[:6]:  # a water cylinder-ish block: no air inside a body
        ds = pydicom.dcmread(f)
        arr = np.full((ds.Rows, ds.Columns), 1024, dtype=np.uint16)  # 0 HU everywhere
        ds.PixelData = arr.tobytes()
        ds.save_as(phantom / f.name)
    with pytest.raises(SeriesRejected, match="no lungs found"):
        process_series(series_files(phantom), tmp_path / "o1", tiny_predictor)
    assert not (tmp_path / "o1").exists()  # no result written

    # a non-CT object (here a SEG the node wrote) is refused with the reason
    r = process_series(
        noncovid_files, tmp_path / "o2", tiny_predictor, ResultOptions(include_lung_segment=False)
    )
    with pytest.raises(SeriesRejected, match="unsupported SOP class"):
        process_series([r.seg_path], tmp_path / "o3", tiny_predictor)
    not_dicom = tmp_path / "notes"
    not_dicom.mkdir()
    (not_dicom / "a.txt").write_text("hello")
    with pytest.raises(SeriesRejected, match="no DICOM files"):
        series_files(not_dicom)
