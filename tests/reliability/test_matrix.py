"""The reliability matrix (issue 13): the real node as a separate process (`ctmtl-node
serve`, tiny checkpoint, SQLite, metrics on) gets one bad input per case while a good
control series is in flight, over real associations. For every case the test asserts the
DICOM status, the stored outcome and reason (`ctmtl-node status --json`), that the control
series was processed untouched, and that no traceback reached the log.

docs/reliability.md keeps the table of cases; each row names the test that proves it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node.conftest import derive_series, store_files
from ops.conftest import NodeProcess, base_sections, write_toml
from ops.conftest import node_process as node_process
from pydicom.dataset import Dataset

from helpers import NODE_CLI, free_port, wait_for

pytestmark = [
    pytest.mark.data,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),  # the bad inputs, written here
]

BIRTH_DATE = "1961-07-04"
N = 10  # slices per case series (selection.min_slices is 8)


@dataclass
class Case:
    name: str
    edit: Callable[[Dataset, int], None] | None
    statuses: set[int]  # every C-STORE status of the case's series
    state: str  # the series' final state
    reason: str | None = None  # in the stored reason or refusals
    files: list[Path] | None = None


def _strip_type2(ds: Dataset, _i: int) -> None:
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        if keyword in ds:
            del ds[keyword]


def _japanese(ds: Dataset, _i: int) -> None:
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def _bad_date(ds: Dataset, _i: int) -> None:
    ds.PatientBirthDate = BIRTH_DATE


def _uuid_sop(ds: Dataset, i: int) -> None:
    value = f"6ba7b810-9dad-11d1-80b4-00c04fd430{i:02d}"
    ds.SOPInstanceUID = value
    ds.file_meta.MediaStorageSOPInstanceUID = value


def _empty_frame_of_reference(ds: Dataset, _i: int) -> None:
    ds.FrameOfReferenceUID = ""


def _absurd_size(ds: Dataset, _i: int) -> None:
    ds.Rows = ds.Columns = 60000


def _mr(ds: Dataset, _i: int) -> None:
    ds.Modality = "MR"


CASES = [
    Case("anonymised, Type 2 attributes absent", _strip_type2, {0}, "done"),
    Case("Specific Character Set \\ISO 2022 IR 87", _japanese, {0}, "done"),
    Case("non-DICOM Patient's Birth Date", _bad_date, {0}, "done"),
    Case("UUID strings as SOP Instance UIDs", _uuid_sop, {0xA900}, "rejected", "not a valid UID"),
    Case(
        "empty Frame of Reference UID",
        _empty_frame_of_reference,
        {0xA900},
        "rejected",
        "Frame of Reference UID is empty",
    ),
    Case(
        "JPEG Lossless with absurd Rows/Columns",
        _absurd_size,
        {0xC000},
        "rejected",
        "decoded pixel data would be",
    ),
    Case("MR routed by mistake", _mr, {0}, "rejected", "modality"),
]


def _status(config: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [*NODE_CLI, "status", "--config", str(config), "--json", "--limit", "100"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def test_every_bad_input_ends_in_a_status_and_a_stored_reason_and_the_control_is_untouched(
    node_process: Callable[..., NodeProcess],
    noncovid_files: list[Path],
    covid_files: list[Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_toml(
        tmp_path / "node.toml",
        base_sections(
            tmp_path,
            node={"port": port},
            model={"checkpoint": str(tiny_checkpoint)},
            metrics={"enabled": False},
        ),
    )
    node = node_process("serve", "--config", str(config))
    wait_for(lambda: "listening on" in node.log() or not node.alive(), 120, "node listening")
    assert node.alive(), node.log()

    control = derive_series(noncovid_files[:N], tmp_path / "control")
    for k, case in enumerate(CASES):
        # the absurd size needs compressed pixel data (RICORD is JPEG Lossless)
        source = covid_files[100 : 100 + N] if "JPEG" in case.name else noncovid_files[N : 2 * N]
        case.files = derive_series(source, tmp_path / f"case{k}", case.edit)
    # a second series that reuses the control's SOP Instance UIDs (a careless anonymiser)
    control_sops = [str(pydicom.dcmread(f).SOPInstanceUID) for f in control]

    def reuse(ds: Dataset, i: int) -> None:
        ds.SOPInstanceUID = control_sops[i]
        ds.file_meta.MediaStorageSOPInstanceUID = control_sops[i]

    reused = Case("SOP Instance UIDs of another series", reuse, {0xA900}, "rejected", "belongs")
    reused.files = derive_series(noncovid_files[2 * N : 3 * N], tmp_path / "reused", reuse)

    assert store_files(port, control[: N // 2]) == [0] * (N // 2)
    statuses = {case.name: set(store_files(port, case.files or [])) for case in CASES}
    assert store_files(port, control[N // 2 :]) == [0] * (N - N // 2)  # control still in flight
    statuses[reused.name] = set(store_files(port, reused.files or []))
    for case in [*CASES, reused]:
        assert statuses[case.name] == case.statuses, case.name

    uid_of = {
        case.name: str(pydicom.dcmread(case.files[0], stop_before_pixels=True).SeriesInstanceUID)
        for case in [*CASES, reused]
        if case.files
    }
    control_uid = str(pydicom.dcmread(control[0], stop_before_pixels=True).SeriesInstanceUID)

    def final() -> list[dict[str, Any]] | None:
        rows = _status(config)
        by_uid = {r["series_instance_uid"]: r for r in rows}
        wanted = [control_uid, *uid_of.values()]
        if all(
            u in by_uid and by_uid[u]["state"] in ("done", "rejected", "failed") for u in wanted
        ):
            return rows
        return None

    rows = wait_for(final, 300, "every series judged or processed", step=1.0)
    by_uid = {r["series_instance_uid"]: r for r in rows}
    control_row = by_uid[control_uid]
    assert control_row["state"] == "done" and control_row["instances"] == N, control_row
    assert not control_row["refused_instances"]
    for case in [*CASES, reused]:
        row = by_uid[uid_of[case.name]]
        assert row["state"] == case.state, (case.name, row)
        if case.reason is not None:
            said = (row["reason"] or "") + json.dumps(row["refused_instances"])
            assert case.reason in said, (case.name, row)

    log = node.log()
    assert "Traceback" not in log
    assert BIRTH_DATE not in log and "19610704" not in log
    assert BIRTH_DATE not in json.dumps(rows)
    assert "山田" not in log and "Yamada" not in log
    assert node.stop() == 0
