"""Per-slice output of the node and `ctmtl-node evaluate` on DICOM folders and PNG stacks."""

from __future__ import annotations

import json
import subprocess
from itertools import product
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.evaluate import (
    LabelsError,
    SeriesScore,
    load_png_stack,
    load_series_input,
    read_labels,
    summarise,
)
from dicom_node.pipeline import process_series
from dicom_node.volume import load_series
from helpers import NODE_CLI, REPO, copy_files
from mtl_model import LUNG_WINDOW, Predictor


def _phantom_stack(folder: Path, n: int, lung_radius: int, seed: int) -> Path:
    """A chest-like PNG stack in the lung window: a soft-tissue body with two air-filled
    lungs and some noise, so the node's HU lung mask finds lungs in it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:256, :256]
    body = ((yy - 128) / 100.0) ** 2 + ((xx - 128) / 120.0) ** 2 <= 1
    lungs = np.zeros_like(body)
    for cx in (80, 176):
        lungs |= ((yy - 128) / (1.4 * lung_radius)) ** 2 + ((xx - cx) / lung_radius) ** 2 <= 1
    for k in range(n):
        hu = np.full((256, 256), -1000.0)
        hu[body] = 40.0
        hu[lungs] = -850.0
        hu += rng.normal(0, 20, hu.shape)
        grey = np.clip((hu - LUNG_WINDOW.low) / LUNG_WINDOW.width * 255, 0, 255)
        Image.fromarray(np.rint(grey).astype(np.uint8)).save(folder / f"z_{k}.png")
    (folder / "stack.json").write_text(json.dumps({"spacing_mm": [5.0, 1.2, 1.2]}))
    return folder


@pytest.mark.slow
def test_per_slice_output_recomputes_the_series_figure(noncovid_files, tiny_predictor, tmp_path):
    r = process_series(noncovid_files, tmp_path / "out", tiny_predictor)
    slices = r.slices
    assert len(slices) == 30
    keys = {"sop_instance_uid", "z_mm", "covid_probability", "lesion_ml", "in_lung"}
    assert set(slices[0]) == keys
    z = [s["z_mm"] for s in slices]
    assert z == sorted(z) and len(set(z)) == 30  # patient order, feet first
    by_uid = {
        str(ds.SOPInstanceUID): float(ds.ImagePositionPatient[2])
        for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in noncovid_files)
    }
    assert {s["sop_instance_uid"] for s in slices} == set(by_uid)
    for s in slices:  # axial series: the position along the normal is the z coordinate
        assert s["z_mm"] == pytest.approx(by_uid[s["sop_instance_uid"]], abs=1e-3)
    probs = np.array([s["covid_probability"] for s in slices])
    in_lung = np.array([s["in_lung"] for s in slices])
    assert in_lung.any()
    series = tiny_predictor.aggregate_series(probs, in_lung)
    assert r.covid_probability == pytest.approx(series, abs=1e-4)
    assert sum(s["lesion_ml"] for s in slices) == pytest.approx(r.lesion_volume_ml, abs=0.05)
    assert r.covid_threshold == 0.5
    line = json.loads(json.dumps(r.to_json()))
    assert line["slices"] == slices and line["covid_threshold"] == 0.5


def test_summary_auc_and_rates_equal_a_hand_computation():
    probs = {(0.9, 1), (0.4, 1), (0.7, 0), (0.2, 0), (0.1, 0)}
    scores = [
        SeriesScore(f"s{i}", c, "scored", covid_probability=p) for i, (p, c) in enumerate(probs)
    ]
    scores.append(SeriesScore("gone", 1, "failed", reason="not found"))
    m = summarise(scores, threshold=0.5, n_boot=50)
    pos = [p for p, c in probs if c]
    neg = [p for p, c in probs if not c]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg)]
    assert m["auc"] == pytest.approx(sum(pairs) / len(pairs)) == pytest.approx(5 / 6)
    assert m["sensitivity"] == 0.5  # 0.9 yes, 0.4 no
    assert m["specificity"] == pytest.approx(2 / 3)  # 0.7 is a false positive
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["accuracy_counting_unscored"] == pytest.approx(3 / 6)
    assert (m["n"], m["n_scored"], m["n_failed"], m["n_rejected"]) == (6, 5, 1, 0)


def test_png_stack_gets_the_hu_its_window_implies(tmp_path):
    folder = tmp_path / "stack"
    folder.mkdir()
    values = {2: 0, 10: 255, 1: 60}  # natural order: z_1, z_2, z_10
    for k, v in values.items():
        Image.fromarray(np.full((8, 8), v, np.uint8)).save(folder / f"z_{k}.png")
    s = load_png_stack(folder)
    assert s.kind == "png_stack" and s.slice_ids == ["z_1.png", "z_2.png", "z_10.png"]
    assert s.spacing == (2.5, 0.7, 0.7) and s.z_mm == [0.0, 2.5, 5.0]
    assert s.hu[:, 0, 0].tolist() == pytest.approx([60 / 255 * 1500 - 1350, -1350.0, 150.0])
    (folder / "stack.json").write_text(
        '{"spacing_mm": [1, 0.5, 0.5], "window_center": -500, "window_width": 1000}'
    )
    s = load_png_stack(folder)
    assert s.spacing == (1.0, 0.5, 0.5)
    assert s.hu[:, 0, 0].tolist() == pytest.approx([60 / 255 * 1000 - 1000, -1000.0, 0.0])


@pytest.mark.slow
def test_dicom_folder_loads_as_the_node_loads_it(noncovid_files, tmp_path):
    folder = tmp_path / "series"
    copy_files(noncovid_files, folder)
    s = load_series_input(folder)
    v = load_series(noncovid_files)
    assert s.kind == "dicom" and s.series_instance_uid == v.series_instance_uid
    np.testing.assert_array_equal(s.hu, v.hu)
    assert s.spacing == v.spacing and len(s.slice_ids) == 30


def test_malformed_labels_list_every_problem(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("path,covid\na,1\n,0\nb,yes\na,0\nc,1,extra\n")
    with pytest.raises(LabelsError) as info:
        read_labels(bad)
    problems = info.value.problems
    assert len(problems) == 4
    assert "line 3: empty path" in problems[0]
    assert "line 4: covid must be 0 or 1, got 'yes'" in problems[1]
    assert "line 5: a is listed already on line 2" in problems[2]
    assert "line 6: 3 fields" in problems[3]
    (tmp_path / "h.csv").write_text("series,label\nx,1\n")
    with pytest.raises(LabelsError, match="lacks column"):
        read_labels(tmp_path / "h.csv")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NODE_CLI, "evaluate", *args], capture_output=True, text=True, timeout=600, cwd=REPO
    )


@pytest.mark.slow
def test_evaluate_cli_scores_stacks_and_lists_bad_series(noncovid_files, tiny_checkpoint, tmp_path):
    root = tmp_path / "data"
    for name, radius, seed in (("a", 30, 1), ("b", 40, 2), ("c", 35, 3), ("d", 45, 4)):
        _phantom_stack(root / name, 6, radius, seed)
    mr = copy_files(noncovid_files[:5], root / "mr")
    for f in mr:
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        ds.save_as(f)
    (root / "empty").mkdir()
    labels = root / "labels.csv"
    labels.write_text("path,covid\na,1\nb,0\nc,1\nd,0\nmissing,1\nempty,0\nmr,0\n")
    out = tmp_path / "eval.json"
    proc = _cli(
        "--series", str(labels), "--json", str(out), "--report", str(tmp_path / "rep"),
        "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    by_path = {s["path"]: s for s in res["series"]}
    assert [by_path[p]["status"] for p in "abcd"] == ["scored"] * 4
    assert by_path["missing"]["status"] == "failed" and "not found" in by_path["missing"]["reason"]
    assert by_path["empty"]["status"] == "rejected"
    assert "neither DICOM files nor PNG slices" in by_path["empty"]["reason"]
    assert by_path["mr"]["status"] == "rejected"
    assert "unsupported SOP class" in by_path["mr"]["reason"]
    for name in ("missing", "empty", "mr"):
        assert name in proc.stderr  # one line per problem
    m = res["metrics"]
    assert (m["n"], m["n_scored"], m["n_rejected"], m["n_failed"]) == (7, 4, 2, 1)
    pos = [by_path[p]["covid_probability"] for p in "ac"]
    neg = [by_path[p]["covid_probability"] for p in "bd"]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg)]
    assert m["auc"] == pytest.approx(sum(pairs) / 4)
    for s in (by_path[p] for p in "abcd"):  # the node's own aggregation of its slices
        probs = np.array([x["covid_probability"] for x in s["slices"]])
        in_lung = np.array([x["in_lung"] for x in s["slices"]])
        assert s["covid_probability"] == pytest.approx(
            Predictor.aggregate_series(probs, in_lung), abs=1e-4
        )
        assert s["kind"] == "png_stack" and s["lung_volume_ml"] > 100
    for name in ("roc.png", "report.md", "series.csv"):
        assert (tmp_path / "rep" / name).is_file()
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| `mr` | 0 | rejected |" in report and "series AUC" in report


def test_evaluate_cli_exit_codes_for_bad_input(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,covid\nx,2\ny,\n")
    proc = _cli("--series", str(bad), "--json", str(tmp_path / "o.json"))
    assert proc.returncode == 2
    assert "line 2: covid must be 0 or 1, got '2'" in proc.stderr
    assert "line 3: covid must be 0 or 1, got ''" in proc.stderr
    assert not (tmp_path / "o.json").exists()

    nothing = tmp_path / "nothing.csv"
    nothing.write_text("path,covid\nnope,1\n")
    proc = _cli(
        "--series", str(nothing), "--json", str(tmp_path / "n.json"),
        "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "no series could be scored" in proc.stderr and "nope" in proc.stderr
    assert json.loads((tmp_path / "n.json").read_text())["metrics"]["n_failed"] == 1
