"""Japanese, Korean and Chinese names survive into SEG and SR byte for byte (issue 13, 3).

``\\ISO 2022 IR 87`` (an empty first value, the PS3.5 Annex H form) made highdicom refuse
every job, and highdicom 0.28 does not know ``ISO 2022 IR 149`` at all. The source files
here are written by pydicom with the names of PS3.5 Annexes H, I and J, run through the node
path (the ``ctmtl-node process`` CLI, and the function it runs), and read back: the names
decode to the source's and their stored bytes are the source's.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from node.conftest import derive_series
from pydicom.dataset import Dataset

from dicom_node.headers import UTF8, normalise_character_set, result_character_set
from dicom_node.pipeline import run_process_command, write_results
from dicom_node.results import AlgorithmInfo, ResultOptions
from dicom_node.volume import load_series
from helpers import NODE_CLI, REPO

ALGORITHM = AlgorithmInfo(
    name="ctmtl test network", model_version="1.2.3", device_uid="2.25.4244", software_version="0"
)


@dataclass(frozen=True)
class Case:
    charset: str | list[str]  # as the source has it
    name: str
    referring: str
    expected_charset: str | list[str]  # as the results have it
    expected_bytes: bytes | None  # Patient's Name as PS3.5 encodes it (padding aside)


CASES = {
    # PS3.5 H.3.1: ISO 2022 IR 87 (JIS X 0208) with the default repertoire, empty first value
    "japanese": Case(
        ["", "ISO 2022 IR 87"],
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "Sato^Hanako=佐藤^花子=さとう^はなこ",
        ["ISO 2022 IR 6", "ISO 2022 IR 87"],
        b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
    ),
    # PS3.5 I.2: ISO 2022 IR 149 (KS X 1001), again with an empty first value
    "korean": Case(
        ["", "ISO 2022 IR 149"],
        "Hong^Gildong=洪^吉洞=홍^길동",
        "Kim^Cheolsu=金^哲洙=김^철수",
        ["ISO 2022 IR 6", "ISO 2022 IR 149"],
        b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf",
    ),
    # PS3.5 J.3: GB18030 (stand-alone)
    "chinese": Case(
        "GB18030",
        "Wang^XiaoDong=王^小東",
        "Li^Hua=李^华",
        "GB18030",
        None,
    ),
}


def _named_series(noncovid_files: list[Path], folder: Path, case: Case) -> list[Path]:
    def edit(ds: Dataset, _index: int) -> None:
        ds.SpecificCharacterSet = case.charset
        ds.PatientName = case.name
        ds.ReferringPhysicianName = case.referring

    return derive_series(noncovid_files, folder, edit)


def _stored(ds: Dataset, keyword: str) -> bytes:
    """The bytes of an element as the file has them (the raw element, never converted)."""
    elem = ds.get_item(keyword)
    assert elem is not None and isinstance(elem.value, bytes), keyword
    return elem.value


def _cli_process(series: Path, out: Path, checkpoint: Path) -> dict[str, object]:
    args = ["process", str(series), "--out", str(out), "--checkpoint", str(checkpoint)]
    proc = subprocess.run(
        [*NODE_CLI, *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("language", list(CASES))
def test_names_survive_byte_for_byte(
    language: str,
    noncovid_files: list[Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
    dciodvfy_errors: Callable[[Path], list[str]],
) -> None:
    case = CASES[language]
    files = _named_series(noncovid_files, tmp_path / "series", case)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    source_name = _stored(source, "PatientName")
    source_referring = _stored(source, "ReferringPhysicianName")
    if case.expected_bytes is not None:  # pydicom wrote the source as PS3.5 shows it
        assert source_name.rstrip(b" ") == case.expected_bytes
    assert str(source.PatientName) == case.name

    if language == "japanese":  # the CLI itself once; the others through its function
        out = _cli_process(tmp_path / "series", tmp_path / "out", tiny_checkpoint)
    else:
        out = run_process_command(
            tmp_path / "series", tmp_path / "out", checkpoint=tiny_checkpoint, device="cpu"
        )

    for key in ("seg_path", "sr_path"):
        path = Path(str(out[key]))
        raw = pydicom.dcmread(path, stop_before_pixels=True)
        assert _stored(raw, "PatientName") == source_name, path.name
        assert _stored(raw, "ReferringPhysicianName") == source_referring, path.name
        assert raw.SpecificCharacterSet == case.expected_charset
        assert str(raw.PatientName) == str(source.PatientName) == case.name
        assert str(raw.ReferringPhysicianName) == case.referring
        assert dciodvfy_errors(path) == [], path.name
    seg = hd.seg.segread(Path(str(out["seg_path"])))
    sr = hd.sr.srread(Path(str(out["sr_path"])))
    assert str(seg.PatientName) == str(sr.PatientName) == case.name


def test_character_set_normalisation() -> None:
    def source(value: object) -> Dataset:
        ds = Dataset()
        if value is not None:
            ds.SpecificCharacterSet = value
        return ds

    assert normalise_character_set(source(None)) is None
    assert normalise_character_set(source("")) is None
    assert normalise_character_set(source("ISO_IR 100")) == "ISO_IR 100"
    assert normalise_character_set(source(["", "ISO 2022 IR 87"])) == [
        "ISO 2022 IR 6",
        "ISO 2022 IR 87",
    ]
    assert normalise_character_set(source(["ISO 2022 IR 6", "ISO 2022 IR 58"])) == [
        "ISO 2022 IR 6",
        "ISO 2022 IR 58",
    ]
    assert normalise_character_set(source("ISO_IR 999")) == UTF8  # unknown: text survives
    # the texts the results add must fit: otherwise UTF-8
    assert result_character_set(source("ISO_IR 100"), ["für die Forschung"]) == "ISO_IR 100"
    assert result_character_set(source(None), ["für die Forschung"]) == UTF8
    assert result_character_set(source(["", "ISO 2022 IR 87"]), ["für"]) == UTF8
    assert result_character_set(source(["", "ISO 2022 IR 87"]), ["研究用"]) == [
        "ISO 2022 IR 6",
        "ISO 2022 IR 87",
    ]


def test_site_disclaimer_outside_the_source_charset_gives_utf8(
    noncovid_files: list[Path], tmp_path: Path, dciodvfy_errors: Callable[[Path], list[str]]
) -> None:
    """A disclaimer the source's character set cannot hold: the results are UTF-8, and the
    name still reads as in the source (text, not bytes, survive)."""
    case = CASES["japanese"]
    files = _named_series(noncovid_files, tmp_path / "series", case)
    volume = load_series(files)
    lungs = np.zeros(volume.shape, dtype=bool)
    lungs[:, 200:300, 200:300] = True
    options = ResultOptions(disclaimer="Nur für die Forschung, nicht für die Diagnose.")
    result = write_results(
        volume, np.zeros_like(lungs), lungs, 0.3, tmp_path / "out", options, ALGORITHM
    )
    for path in (result.seg_path, result.sr_path):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SpecificCharacterSet == UTF8
        assert str(ds.PatientName) == case.name
        assert dciodvfy_errors(path) == [], path.name
    sr = hd.sr.srread(result.sr_path)
    texts = [item.TextValue for item in sr.ContentSequence[-1].ContentSequence]
    assert options.disclaimer in texts
