"""dicom_node.volume on the real series: order, HU, spacing, decoding, geometry checks."""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLosslessSV1, generate_uid

from dicom_node.volume import (
    ENHANCED_CT_IMAGE_STORAGE,
    SeriesRejected,
    check_geometry,
    load_series,
)
from helpers import legacy_multiframe


@pytest.fixture(scope="module")
def noncovid_volume(noncovid_files: list[Path]):
    return load_series(noncovid_files)


@pytest.mark.slow
def test_covid_series_jpeg_lossless_is_decoded_sorted_and_in_hu(
    covid_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = pydicom.dcmread(covid_files[0], stop_before_pixels=True)
    assert first.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    shuffled = covid_files[:]
    random.Random(1).shuffle(shuffled)
    vol = load_series(shuffled)

    assert vol.shape == (255, 512, 512)
    assert vol.spacing == pytest.approx((1.25, 0.703125, 0.703125))
    z = vol.positions[:, 2]
    assert np.allclose(np.diff(z), 1.25)  # sorted along the normal (0, 0, 1), ascending
    assert np.allclose(vol.direction, np.eye(3))
    assert [ds.SOPInstanceUID for ds in vol.datasets] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        for f in sorted(
            covid_files,
            key=lambda f: float(
                pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]
            ),
        )
    ]
    assert "PixelData" not in vol.datasets[0]  # headers only are kept

    # decoding in worker processes gives the same volume
    with caplog.at_level(logging.WARNING, logger="dicom_node.volume"):
        parallel = load_series(covid_files[:40], workers=2)
    assert "parallel decoding failed" not in caplog.text
    np.testing.assert_array_equal(parallel.hu, load_series(covid_files[:40]).hu)

    hu = vol.hu
    assert hu.dtype == np.float32
    assert hu.min() == -1024  # padding (-2000 stored) and below-air values become air
    assert 1000 < hu.max() < 4000  # bone / contrast
    centre = hu[128, 200:300, 200:300]
    assert -200 < float(np.median(centre)) < 200  # mediastinum: soft tissue
    lung_roi = hu[128, 200:300, 80:160]
    assert -1000 < float(np.median(lung_roi)) < -500  # aerated lung

    # cross-check the pylibjpeg decode with DCMTK's decoder on one slice
    dcmdjpeg = shutil.which("dcmdjpeg")
    if dcmdjpeg is None:
        pytest.skip("dcmdjpeg (DCMTK) not installed")
    k = 100
    src = next(
        f
        for f in covid_files
        if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        == vol.datasets[k].SOPInstanceUID
    )
    out = tmp_path / "raw.dcm"
    subprocess.run([dcmdjpeg, str(src), str(out)], check=True, capture_output=True)
    raw = pydicom.dcmread(out)
    expected = raw.pixel_array.astype(np.float32) * float(raw.RescaleSlope) + float(
        raw.RescaleIntercept
    )
    expected = np.maximum(expected, -1024)
    np.testing.assert_array_equal(vol.hu[k], expected)


def test_noncovid_series_uncompressed(noncovid_volume, noncovid_files: list[Path]) -> None:
    vol = noncovid_volume
    assert vol.shape == (30, 512, 512)
    assert vol.spacing == pytest.approx((8.0, 0.646484375, 0.646484375))
    assert np.allclose(np.diff(vol.positions[:, 2]), 8.0)
    assert vol.origin == pytest.approx([-173.1767578125, -294.1767578125, 80.0])
    assert vol.voxel_volume_ml == pytest.approx(8.0 * 0.646484375**2 / 1000)
    # HU = stored * slope + intercept, slice by slice
    raw = pydicom.dcmread(noncovid_files[0])
    k = [ds.SOPInstanceUID for ds in vol.datasets].index(raw.SOPInstanceUID)
    np.testing.assert_array_equal(
        vol.hu[k], np.maximum(raw.pixel_array.astype(np.float32) - 1024.0, -1024.0)
    )
    assert not vol.is_multiframe
    assert vol.series_instance_uid == raw.SeriesInstanceUID
    assert vol.frame_of_reference_uid == raw.FrameOfReferenceUID


def test_resent_instances_are_ignored(noncovid_files: list[Path], noncovid_volume) -> None:
    vol = load_series(noncovid_files + noncovid_files[:3])
    assert vol.shape == noncovid_volume.shape
    np.testing.assert_array_equal(vol.hu, noncovid_volume.hu)


def test_real_series_have_no_geometry_problems(noncovid_headers) -> None:
    assert check_geometry(noncovid_headers) == []


def _copy(headers: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return [copy.deepcopy(ds) for ds in headers]


def test_missing_slice_is_reported(noncovid_headers, noncovid_files) -> None:
    headers = sorted(_copy(noncovid_headers), key=lambda d: float(d.ImagePositionPatient[2]))
    del headers[12]
    problems = check_geometry(headers)
    assert len(problems) == 1 and "1 missing slice" in problems[0], problems
    # and the loader refuses the series with that reason
    by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in noncovid_files}
    files = [by_uid[ds.SOPInstanceUID] for ds in headers]
    with pytest.raises(SeriesRejected, match="missing slice"):
        load_series(files)


def test_mixed_orientation_is_reported(noncovid_headers) -> None:
    headers = _copy(noncovid_headers)
    headers[5].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice
    problems = check_geometry(headers)
    assert any("2 different orientations" in p for p in problems), problems


def test_irregular_spacing_duplicates_and_tilt_are_reported(noncovid_headers) -> None:
    headers = sorted(_copy(noncovid_headers), key=lambda d: float(d.ImagePositionPatient[2]))
    x, y, z = (float(v) for v in headers[10].ImagePositionPatient)
    headers[10].ImagePositionPatient = [x, y, z + 3.0]
    assert any("irregular slice spacing" in p for p in check_geometry(headers))

    headers = sorted(_copy(noncovid_headers), key=lambda d: float(d.ImagePositionPatient[2]))
    headers[10].ImagePositionPatient = list(headers[11].ImagePositionPatient)
    assert any("duplicate slice position" in p for p in check_geometry(headers))

    headers = sorted(_copy(noncovid_headers), key=lambda d: float(d.ImagePositionPatient[2]))
    for i, ds in enumerate(headers):  # gantry tilt: y shifts with z
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 2.0 * i, z]
    assert any("not stacked along the slice normal" in p for p in check_geometry(headers))


def test_mixed_series_sizes_and_sop_classes_are_reported(noncovid_headers) -> None:
    headers = _copy(noncovid_headers)
    headers[3].SeriesInstanceUID = generate_uid()
    assert any("2 different series" in p for p in check_geometry(headers))

    headers = _copy(noncovid_headers)
    headers[3].Rows = 256
    assert any("different sizes" in p for p in check_geometry(headers))

    headers = _copy(noncovid_headers)
    for ds in headers:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    assert any("unsupported SOP class" in p for p in check_geometry(headers))

    headers = _copy(noncovid_headers)
    del headers[0].ImagePositionPatient
    assert any("geometry unreadable" in p for p in check_geometry(headers))


def test_unreadable_file_rejects_the_series(noncovid_files, tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(SeriesRejected, match=r"bad\.dcm"):
        load_series([*noncovid_files[:5], bad])
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(noncovid_files[7].read_bytes()[:-100_000])
    with pytest.raises(SeriesRejected, match=r"truncated\.dcm"):
        load_series([*noncovid_files[:7], truncated])


@pytest.fixture(scope="module")
def multiframe_ct(noncovid_files: list[Path]) -> pydicom.Dataset:
    """The 30-slice series as one Legacy Converted Enhanced CT instance, frames shuffled."""
    return legacy_multiframe(noncovid_files, seed=3, series_number=99)


def test_multiframe_ct_matches_single_frame(multiframe_ct, noncovid_volume, tmp_path) -> None:
    path = tmp_path / "mf.dcm"
    multiframe_ct.save_as(path, enforce_file_format=True)
    vol = load_series([path])
    assert vol.is_multiframe
    assert vol.shape == noncovid_volume.shape
    assert vol.spacing == pytest.approx(noncovid_volume.spacing)
    np.testing.assert_allclose(vol.positions, noncovid_volume.positions)
    np.testing.assert_array_equal(vol.hu, noncovid_volume.hu)
    # frame order in the file differs from the sorted order, and source_order undoes it
    assert vol.frame_numbers != sorted(vol.frame_numbers or [])
    frames = vol.source_order(np.arange(vol.shape[0]))
    assert [frames[f - 1] for f in vol.frame_numbers or []] == list(range(vol.shape[0]))

    # the same file as Enhanced CT Image Storage is read the same way
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    vol2 = load_series([ds])
    np.testing.assert_array_equal(vol2.hu, noncovid_volume.hu)


def test_decoding_processes_are_started_once_and_reused(covid_files: list[Path]) -> None:
    """The worker's pool (`[worker] decode_workers`): started and warmed before the first
    series, the same processes for every series, the same volume as the serial path."""
    from concurrent.futures import ProcessPoolExecutor

    from dicom_node.volume import _decoder_ready, decode_pool, decode_workers

    assert decode_pool(0) is None and decode_pool(1) is None
    assert decode_workers(3) == 3 and 1 <= decode_workers(-1) <= 8
    assert decode_workers(-1, persistent=False) in (0, 8)  # one-off pools need 8 cores
    pool = decode_pool(2)
    assert isinstance(pool, ProcessPoolExecutor)
    try:
        pids = {f.result() for f in [pool.submit(_decoder_ready, 0.5) for _ in range(2)]}
        serial = load_series(covid_files[:20]).hu
        np.testing.assert_array_equal(load_series(covid_files[:20], workers=pool).hu, serial)
        np.testing.assert_array_equal(
            load_series(covid_files[20:40], workers=pool).hu, load_series(covid_files[20:40]).hu
        )
        again = {f.result() for f in [pool.submit(_decoder_ready, 0.5) for _ in range(2)]}
        assert len(pids) == 2 and again == pids  # kept, not restarted per series
        for pid in pids:  # Ctrl-C reaches the process group: the node stops the pool
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        after = {f.result() for f in [pool.submit(_decoder_ready, 0.5) for _ in range(2)]}
        assert after == pids
    finally:
        pool.shutdown()


def test_worker_decoding_reports_and_refuses_like_the_serial_path(
    covid_files: list[Path], noncovid_files: list[Path], tmp_path: Path
) -> None:
    """Slices go to the decoding processes before the headers are read: a corrupt slice
    still rejects the series with its name, an absurd header is refused before decoding,
    and a series rejected by its headers leaves the shared pool ready for the next."""
    from pydicom.encaps import encapsulate

    from dicom_node.volume import _decode_file, _Decoding, decode_pool

    files = [Path(shutil.copy(f, tmp_path / f.name)) for f in covid_files[:20]]
    broken = pydicom.dcmread(files[7])
    broken.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(4000)])
    broken.save_as(files[7])
    with pytest.raises(SeriesRejected, match=f"cannot decode pixel data of {files[7].name}"):
        load_series(files, workers=2)

    absurd = pydicom.dcmread(files[3])
    absurd.Rows = absurd.Columns = 60000
    absurd.save_as(tmp_path / "absurd.dcm")
    assert "over the limit" in str(_decode_file(str(tmp_path / "absurd.dcm")))
    assert isinstance(_decode_file(str(files[3])), np.ndarray)  # compressed: the worker's
    uncompressed = _Decoding(noncovid_files, 2)  # uncompressed: the caller's, no pool started
    assert uncompressed._own is None and uncompressed.take(noncovid_files[0]) is None

    pool = decode_pool(2)
    assert pool is not None
    try:
        twin = pydicom.dcmread(files[1])
        twin.SOPInstanceUID = generate_uid()
        twin.save_as(tmp_path / "twin.dcm")  # a second slice at the same position
        with pytest.raises(SeriesRejected, match="position"):
            load_series([*covid_files[20:40], tmp_path / "twin.dcm", files[1]], workers=pool)
        np.testing.assert_array_equal(
            load_series(covid_files[40:60], workers=pool).hu, load_series(covid_files[40:60]).hu
        )
    finally:
        pool.shutdown()
