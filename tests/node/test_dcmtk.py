"""DCMTK as the peer: echoscu/storescu against the node, in every accepted syntax family."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.db import Instance, Job, JobState, Series, SeriesState
from dicom_node.service import NodeService
from helpers import dcmtk_tool, wait_for


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, check=False)


def _storescu(*options: str, port: int, paths: Iterable[Path]) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu as STORESCU to the node (CTMTL) on 127.0.0.1:`port`."""
    return _run(
        dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "CTMTL", *options,
        "127.0.0.1", str(port), *map(str, paths),
    )  # fmt: skip


def _new_uid_copy(src: Path, dest: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dest, enforce_file_format=True)
    return dest


@pytest.fixture
def node(
    make_config: Callable[..., NodeConfig], start_node: Callable[..., NodeService]
) -> NodeService:
    cfg = make_config(
        allowed_callers=[{"ae_title": "STORESCU", "host": "127.0.0.1"}, {"ae_title": "ECHOSCU"}],
        completion={"idle_seconds": 1.0},
    )
    return start_node(cfg, worker=False, exporter=False)


def test_echoscu(node: NodeService) -> None:
    echoscu = dcmtk_tool("echoscu")
    ok = _run(echoscu, "-aet", "ECHOSCU", "-aec", "CTMTL", "127.0.0.1", str(node.port))
    assert ok.returncode == 0, ok.stderr
    wrong_called = _run(echoscu, "-aet", "ECHOSCU", "-aec", "OTHER", "127.0.0.1", str(node.port))
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr + wrong_called.stdout
    not_allowed = _run(echoscu, "-aet", "INTRUDER", "-aec", "CTMTL", "127.0.0.1", str(node.port))
    assert not_allowed.returncode != 0
    assert "Calling AE Title Not Recognized" in not_allowed.stderr + not_allowed.stdout


@pytest.fixture(scope="module")
def encoded(covid_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real slice re-encoded into every transfer syntax family the node accepts."""
    work = tmp_path_factory.mktemp("encoded")
    src = covid_files[100]
    native = work / "native.dcm"
    done = _run(dcmtk_tool("dcmdjpeg"), str(src), str(native))
    assert done.returncode == 0, done.stderr
    # DCMTK's near-lossless JPEG-LS needs unsigned pixels: same HU, shifted stored values
    ds = pydicom.dcmread(native)
    stored = np.clip(ds.pixel_array.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    ds.PixelRepresentation = 0
    ds.BitsStored, ds.HighBit = 12, 11
    ds.RescaleIntercept = float(ds.RescaleIntercept) - 1024
    del ds.PixelPaddingValue
    unsigned = work / "unsigned.dcm"
    ds.save_as(unsigned, enforce_file_format=True)
    out: dict[str, Path] = {JPEGLosslessSV1: _new_uid_copy(src, work / "sv1.dcm")}
    for ts, tool, args, source in (
        (ExplicitVRLittleEndian, "dcmconv", ["+te"], native),
        (ImplicitVRLittleEndian, "dcmconv", ["+ti"], native),
        (DeflatedExplicitVRLittleEndian, "dcmconv", ["+td"], native),
        (JPEGLossless, "dcmcjpeg", ["+el"], native),
        (JPEGLSLossless, "dcmcjpls", ["+el"], native),
        (JPEGLSNearLossless, "dcmcjpls", ["+en"], unsigned),
        (RLELossless, "dcmcrle", [], native),
    ):
        dest = work / f"{tool}{''.join(args)}.dcm"
        result = _run(dcmtk_tool(tool), *args, str(source), str(dest))
        assert result.returncode == 0, (tool, result.stderr)
        out[ts] = _new_uid_copy(dest, dest)
    # JPEG 2000 (DCMTK's free edition has no J2K codec): encoded with OpenJPEG via pydicom
    for ts, kwargs in ((JPEG2000Lossless, {}), (JPEG2000, {"j2k_cr": [20]})):
        ds = pydicom.dcmread(native)
        ds.compress(ts, **kwargs)
        dest = work / f"j2k-{ts}.dcm"
        ds.save_as(dest, enforce_file_format=True)
        out[ts] = _new_uid_copy(dest, dest)
    # JPEG baseline is 8-bit only: a windowed 8-bit copy, compressed by dcmcjpeg
    ds = pydicom.dcmread(native)
    hu = ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept)
    ds.PixelData = np.clip((hu + 1000) / 1400 * 255, 0, 255).astype(np.uint8).tobytes()
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = -1000, 1400 / 255
    del ds.PixelPaddingValue
    eight = work / "eight.dcm"
    ds.save_as(eight, enforce_file_format=True)
    dest = work / "baseline.dcm"
    result = _run(dcmtk_tool("dcmcjpeg"), "+eb", str(eight), str(dest))
    assert result.returncode == 0, result.stderr
    out[JPEGBaseline8Bit] = _new_uid_copy(dest, dest)
    for ts, path in out.items():
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ts, path
    return out


def _storescu_profile(path: Path, syntaxes: list[str]) -> Path:
    """A storescu association config: one CT presentation context per transfer syntax."""
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[CTContexts]"]
    lines += [f"PresentationContext{i + 1} = CTImageStorage\\TS{i}" for i in range(len(syntaxes))]
    lines += ["[[Profiles]]", "[CTALL]", "PresentationContexts = CTContexts"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_storescu_every_transfer_syntax(
    node: NodeService, encoded: dict[str, Path], tmp_path: Path
) -> None:
    profile = _storescu_profile(tmp_path / "storescu.cfg", list(encoded))
    # each file goes out in its own syntax: no conversion by storescu
    result = _storescu("-xf", str(profile), "CTALL", port=node.port, paths=encoded.values())
    assert result.returncode == 0, result.stderr
    assert "unable to convert" not in result.stderr
    with node.db.session() as s:
        rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
    ref_ds = pydicom.dcmread(encoded[ExplicitVRLittleEndian])
    reference = ref_ds.pixel_array
    ref_hu = apply_modality_lut(reference, ref_ds)
    body = (ref_hu > -1000) & (ref_hu < 1000)
    lossy = {JPEGLSNearLossless, JPEG2000, JPEGBaseline8Bit}
    for ts, path in encoded.items():
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        row = rows[uid]
        assert row.transfer_syntax_uid == ts
        stored = pydicom.dcmread(row.path)
        assert stored.file_meta.TransferSyntaxUID == ts
        pixels = stored.pixel_array  # decodable by the node's pixel handlers
        if ts not in lossy:
            np.testing.assert_array_equal(pixels, reference, err_msg=str(ts))
        else:  # same image within the codec's (or the 8-bit window's) error
            hu = apply_modality_lut(pixels, stored)
            tolerance = {JPEGLSNearLossless: 3, JPEG2000: 25, JPEGBaseline8Bit: 10}[ts]
            assert np.median(np.abs(hu - ref_hu)[body]) <= tolerance, ts


@pytest.mark.slow
def test_storescu_real_series_completes_into_a_job(
    node: NodeService, covid_files: list[Path]
) -> None:
    series_dir = covid_files[0].parent
    result = _storescu("-xs", "+sd", "+r", port=node.port, paths=[series_dir])
    assert result.returncode == 0, result.stderr

    def queued() -> Series | None:
        with node.db.session() as s:
            se = s.scalars(select(Series)).one()
            return se if se.state != SeriesState.RECEIVING else None

    series = wait_for(queued, 30, "series completion")
    assert series.state == SeriesState.QUEUED, series.reason
    assert series.n_instances == 255 and series.calling_ae == "STORESCU"
    with node.db.session() as s:
        jobs = list(s.scalars(select(Job)))
    assert [(j.state, j.n_instances) for j in jobs] == [(JobState.QUEUED, 255)]
