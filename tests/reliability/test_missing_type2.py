"""Anonymised series without Type 2 Patient / Study attributes are processed (issue 13, 1).

Real anonymised CT often lacks Type 2 attributes; highdicom reads them from the source, so
the SEG could not be built after inference. The node repairs the source headers before the
network runs: the results carry such attributes present and empty, and pass dciodvfy.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from node.conftest import derive_series
from pydicom.dataset import Dataset

from dicom_node.headers import TYPE2_PATIENT_STUDY, result_headers, with_result_headers
from dicom_node.pipeline import run_process_command
from dicom_node.results import AlgorithmInfo, ResultOptions
from dicom_node.seg import build_seg
from dicom_node.volume import load_series
from helpers import dcmtk_tool

#: what anonymisers typically remove (issue 13)
ANONYMISED = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
#: the rest of the Type 2 attributes highdicom copies, and the source's Manufacturer
IDS_DATES = ("PatientID", "StudyDate", "StudyTime", "Manufacturer")
ALGORITHM = AlgorithmInfo(
    name="ctmtl test network", model_version="1.2.3", device_uid="2.25.4243", software_version="0"
)


def _remove_with_pydicom(keywords: Sequence[str]) -> Callable[[Dataset, int], None]:
    def edit(ds: Dataset, _index: int) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    return edit


def _remove_with_dcmodify(files: list[Path], keywords: Sequence[str]) -> None:
    """DCMTK's dcmodify erases the attributes in place (``-ea``, no backup files)."""
    args = [arg for kw in keywords for arg in ("-ea", kw)]
    proc = subprocess.run(
        [dcmtk_tool("dcmodify"), "-nb", *args, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _anonymised_series(
    noncovid_files: list[Path], folder: Path, keywords: Sequence[str], tool: str
) -> list[Path]:
    if tool == "pydicom":
        files = derive_series(noncovid_files, folder, _remove_with_pydicom(keywords))
    else:
        files = derive_series(noncovid_files, folder)
        _remove_with_dcmodify(files, keywords)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert not [kw for kw in keywords if kw in ds], "the source must lack the attributes"
    return files


@pytest.mark.parametrize(
    ("keywords", "tool"),
    [(ANONYMISED, "pydicom"), (IDS_DATES, "dcmodify")],
    ids=["anonymised-pydicom", "ids-dates-manufacturer-dcmodify"],
)
def test_series_without_type2_attributes_gives_valid_results(
    keywords: tuple[str, ...],
    tool: str,
    noncovid_files: list[Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
    dciodvfy_errors: Callable[[Path], list[str]],
) -> None:
    files = _anonymised_series(noncovid_files, tmp_path / "series", keywords, tool)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)

    out = run_process_command(
        tmp_path / "series", tmp_path / "out", checkpoint=tiny_checkpoint, device="cpu"
    )

    removed_type2 = [kw for kw in keywords if kw in TYPE2_PATIENT_STUDY]
    kept_type2 = [kw for kw in TYPE2_PATIENT_STUDY if kw not in keywords]
    for key in ("seg_path", "sr_path"):
        path = Path(out[key])
        assert dciodvfy_errors(path) == [], path.name
        result = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in removed_type2:
            assert keyword in result, f"{path.name}: Type 2 {keyword} must be present"
            assert result[keyword].is_empty, f"{path.name}: {keyword} must be empty"
        for keyword in kept_type2:  # what the source has is copied unchanged
            assert result[keyword].value == source[keyword].value, keyword
        assert result.StudyInstanceUID == source.StudyInstanceUID
        assert result.Manufacturer == ResultOptions().manufacturer
    assert out["series_instance_uid"] == source.SeriesInstanceUID


def test_headers_are_repaired_before_the_network_runs(
    noncovid_files: list[Path], tmp_path: Path
) -> None:
    """The repair needs headers only: it is what the pipeline does before inference, and
    without it highdicom fails exactly as the issue reports (AttributeError)."""
    keywords = ANONYMISED + IDS_DATES[:3]
    files = _anonymised_series(noncovid_files, tmp_path / "series", keywords, "pydicom")
    volume = load_series(files)
    empty = np.zeros(volume.shape, dtype=bool)
    with pytest.raises(AttributeError):  # the bug: highdicom reads the missing attributes
        build_seg(volume, empty, None, ResultOptions(), ALGORITHM, "2.25.1", "2.25.2")

    headers, notes = result_headers(volume.datasets)
    assert len(headers) == len(volume.datasets)
    for ds in headers:
        for keyword in TYPE2_PATIENT_STUDY:
            assert keyword in ds and ds[keyword].is_empty, keyword
    assert notes and all(kw in notes[0] for kw in keywords[:9])
    for original in volume.datasets:  # the loaded headers themselves are left alone
        assert "PatientName" not in original

    repaired = with_result_headers(volume)
    assert with_result_headers(repaired) is repaired  # idempotent: nothing left to repair
    seg = build_seg(repaired, empty, None, ResultOptions(), ALGORITHM, "2.25.1", "2.25.2")
    for keyword in TYPE2_PATIENT_STUDY:
        assert seg[keyword].is_empty, keyword
    assert seg.SeriesInstanceUID == "2.25.1"
