"""Spool paths from validated UIDs only; selection rules on real CT headers."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig
from dicom_node.selection import SelectionRules, evaluate
from dicom_node.service import NodeService
from dicom_node.spool import InvalidUID, Spool, SpoolFull, validate_uid

# ---------------------------------------------------------------- spool


@pytest.mark.parametrize(
    "bad",
    [None, "", "../../etc/passwd", "1.2.3/4", "1.2..3", "1.2.3.", "1" * 65, "1.2.3\\4", "1.2.a"],
)
def test_invalid_uids_never_become_paths(tmp_path: Path, bad: object) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(InvalidUID):
        validate_uid(bad)
    with pytest.raises(InvalidUID):
        spool.instance_path("1.2.3", "1.2.3.4", bad)  # type: ignore[arg-type]


def test_atomic_write_and_replace(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.write_instance("1.2", "1.2.3", "1.2.3.4", b"one")
    assert first.path == tmp_path / "spool" / "incoming" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert first.path.read_bytes() == b"one" and not first.replaced
    second = spool.write_instance("1.2", "1.2.3", "1.2.3.4", b"two!")
    assert second.replaced and second.size == 4 and second.sha256 != first.sha256
    assert [p.name for p in first.path.parent.iterdir()] == ["1.2.3.4.dcm"]  # no temp left


def test_spool_refuses_below_free_space_minimum(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_mb=10**12)
    with pytest.raises(SpoolFull):
        spool.write_instance("1.2", "1.2.3", "1.2.3.4", b"x")
    assert not list(tmp_path.rglob("*.dcm"))


def test_remove_stays_inside_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    outside = tmp_path / "keep.txt"
    outside.write_text("x")
    with pytest.raises(ValueError):
        spool.remove(outside)
    assert outside.exists()


# ---------------------------------------------------------------- selection


def _edited(headers: list[Dataset], **attrs: object) -> list[Dataset]:
    out = []
    for ds in headers:
        ds = copy.deepcopy(ds)
        for key, value in attrs.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        out.append(ds)
    return out


def test_real_chest_cts_pass(covid_headers: list[Dataset], noncovid_headers: list[Dataset]) -> None:
    rules = SelectionRules()
    decision = evaluate(covid_headers, rules)
    assert decision.accepted, decision.reasons
    assert decision.n_slices == 255
    assert evaluate(noncovid_headers, rules).accepted  # 8 mm, BodyPartExamined CHEST


@pytest.mark.parametrize(
    ("attrs", "fragment"),
    [
        ({"Modality": "MR"}, "modality MR"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "LOCALIZER"),
        ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]}, "not ORIGINAL"),
        ({"SliceThickness": "10"}, "slice thickness 10 mm"),
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, "not axial"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "SOP class"),
        (
            {
                "BodyPartExamined": "ABDOMEN",
                "SeriesDescription": "ABD PELVIS",
                "StudyDescription": "CT ABDOMEN",
            },
            "do not indicate a chest CT",
        ),
    ],
)
def test_each_rule_rejects_with_reason(
    noncovid_headers: list[Dataset], attrs: dict[str, object], fragment: str
) -> None:
    if "BodyPartExamined" in attrs:
        attrs = {**attrs, "ProtocolName": None}
    decision = evaluate(_edited(noncovid_headers, **attrs), SelectionRules())
    assert not decision.accepted
    assert fragment in decision.reason, decision.reason


def test_min_slices_and_missing_body_part(covid_headers: list[Dataset]) -> None:
    few = evaluate(covid_headers[:10], SelectionRules())
    assert "10 slices, fewer than the minimum 20" in few.reason
    bare = _edited(covid_headers[:25], SeriesDescription=None, StudyDescription=None)
    assert evaluate(bare, SelectionRules()).accepted  # missing tags allowed by default
    strict = SelectionRules(allow_missing_body_part=False)
    assert "missing" in evaluate(bare, strict).reason


def test_rules_can_be_switched_off(noncovid_headers: list[Dataset]) -> None:
    mr = _edited(noncovid_headers, Modality="MR", SliceThickness="10")
    rules = SelectionRules(modalities=[], max_slice_thickness_mm=None)
    assert evaluate(mr, rules).accepted


def test_unfinished_parts_of_a_dead_process_are_removed_at_start(
    tmp_path: Path,
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A `.part` is an instance whose row never committed (never acknowledged): an old one
    goes when the SCP starts, a fresh one (another node's, on a shared spool) and the
    stored instances stay."""
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    stored = spool.write_instance("1.2", "1.2.3", "1.2.3.4", b"kept")
    old = spool.write_pending("1.2", "1.2.3", "1.2.3.5", (b"cut",)).temp
    fresh = spool.write_pending("1.2", "1.2.3", "1.2.3.6", (b"now",)).temp
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    with caplog.at_level(logging.WARNING, logger="dicom_node.scp"):
        start_node(make_config(), worker=False, exporter=False)
    assert not old.exists() and fresh.exists() and stored.path.read_bytes() == b"kept"
    assert "removed 1 unfinished instance file(s) (.part)" in caplog.text
