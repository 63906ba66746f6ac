"""``ctmtl-train evaluate``: the JSON contract of DESIGN.md and the report folder."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_model import build_model, save_checkpoint
from mtl_model.metrics import classification_metrics, roc_auc
from training.cli import main
from training.trainer import build_metadata


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.config import parse_config

    cfg = parse_config(
        {
            "name": "eval-tiny",
            "model": {"base_width": 4, "input_size": 64},
            "data": {"train": [{"kind": "covid_ct", "path": "covid-ct"}]},
        }
    )
    torch.manual_seed(0)
    model = build_model("mtl", 4, 64)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model.eval(), build_metadata(cfg, {}, {}, "0.0.1-test"), path)
    return path


def _check_contract(doc: dict) -> None:
    c, s = doc["classification"], doc["segmentation"]
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        assert isinstance(c[key], float) and 0.0 <= c[key] <= 1.0, key
    assert isinstance(c["n"], int)
    for key in ("dice", "dice_pooled"):
        assert isinstance(s[key], float) and 0.0 <= s[key] <= 1.0, key
    assert isinstance(s["n"], int)


def test_evaluate_json_contract_on_val(
    mini_data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "val.json"
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_checkpoint),
            "--covid-ct",
            str(mini_data / "covid-ct"),
            "--split",
            "val",
            "--medseg",
            str(mini_data / "medseg-100"),
            "--json",
            str(out),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--bootstrap",
            "100",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    _check_contract(doc)
    assert doc["classification"]["n"] == 8 and doc["segmentation"]["n"] == 3
    assert doc["segmentation"]["grid"] == [512, 512]  # Dice on the source grid
    lo, hi = doc["classification"]["auc_ci95"]
    assert lo <= doc["classification"]["auc"] <= hi
    # stdout carries the same two sections as one JSON line
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["classification"] == doc["classification"]
    # the metrics agree with the per-image table
    report = tmp_path / "val_report"
    with (report / "classification.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    assert doc["classification"]["auc"] == pytest.approx(roc_auc(y, p))
    assert doc["classification"]["accuracy"] == pytest.approx(
        classification_metrics(y, p)["accuracy"]
    )
    with (report / "segmentation.csv").open() as fh:
        dices = [float(r["dice"]) for r in csv.DictReader(fh)]
    assert doc["segmentation"]["dice"] == pytest.approx(float(np.mean(dices)))
    assert (report / "roc.png").stat().st_size > 1000
    assert len(list((report / "overlays").glob("*.png"))) == 3
    assert "Classification" in (report / "report.md").read_text()


def test_evaluate_test_split_scores_whole_medseg_folder(
    mini_data: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # a held-back-style test set: UCSD test lists + a folder of MedSeg test slices
    covid = tmp_path / "covid-ct"
    shutil.copytree(mini_data / "covid-ct", covid, symlinks=True)
    for tag in ("COVID", "NonCOVID"):
        shutil.copy(covid / "split" / f"valCT_{tag}.txt", covid / "split" / f"testCT_{tag}.txt")
    medseg = tmp_path / "medseg-test"
    for sub in ("images", "masks"):
        (medseg / sub).mkdir(parents=True)
        for p in sorted((mini_data / "medseg-100" / sub).iterdir())[:4]:
            (medseg / sub / p.name).symlink_to(p.resolve())
    out = tmp_path / "test.json"
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_checkpoint),
            "--covid-ct",
            str(covid),
            "--split",
            "test",
            "--medseg",
            str(medseg),
            "--json",
            str(out),
            "--device",
            "cpu",
            "--bootstrap",
            "50",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    _check_contract(doc)
    assert doc["classification"]["n"] == 8 and doc["segmentation"]["n"] == 4


def test_evaluate_bad_input_is_a_clear_error(
    mini_data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.json"
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_checkpoint),
            "--covid-ct",
            str(mini_data / "covid-ct"),
            "--split",
            "test",
            "--json",
            str(out),
        ]
    )
    assert rc == 2 and not out.exists()
    assert "testCT_COVID.txt" in capsys.readouterr().err
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "missing.safetensors"),
            "--medseg",
            str(mini_data / "medseg-100"),
            "--json",
            str(out),
        ]
    )
    assert rc == 2 and "file not found" in capsys.readouterr().err
