"""``ctmtl-train export`` and the shipped release checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from safetensors import safe_open

from mtl_model import (
    Predictor,
    build_model,
    default_checkpoint_path,
    read_metadata,
    save_checkpoint,
)
from training.cli import main
from training.config import dump_toml
from training.trainer import build_metadata


def _hu_slices(data_dir: Path, n: int = 2) -> np.ndarray:
    files = sorted((data_dir / "dicom" / "lung-pet-ct-dx-a0002").glob("*.dcm"))[12 : 12 + n]
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        out.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(out)


def test_export_writes_inference_fp16_checkpoint(
    mini_data: Path, data_dir: Path, tmp_path: Path, tiny_config, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(cfg))
    (run / "summary.json").write_text(json.dumps({"experiment": "tiny", "best_epoch": 1}))
    torch.manual_seed(0)
    model = build_model("mtl", 4, 64)
    src_meta = build_metadata(
        cfg, {"experiment": "tiny", "epoch": 1, "data": {"train": [{"slices": 24}]}}, {}, "x"
    )
    save_checkpoint(model.eval(), src_meta, run / "best.safetensors")
    out = tmp_path / "release.safetensors"
    rc = main(
        [
            "export",
            "--run",
            str(run),
            "--out",
            str(out),
            "--data",
            str(mini_data),
            "--version",
            "0.1.0-test",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exported"] == str(out)
    meta = read_metadata(out)
    assert meta.model_version == "0.1.0-test"
    assert meta.architecture.tasks == ["segmentation", "classification"]
    assert meta.weights_dtype == "float16"
    assert meta.device_uid != src_meta.device_uid
    val = meta.metrics["validation"]
    assert val["classification"]["n"] == 8 and 0.0 <= val["classification"]["auc"] <= 1.0
    assert val["segmentation"]["n"] == 3 and 0.0 <= val["segmentation"]["dice"] <= 1.0
    assert meta.training["data"]["train"][0]["slices"] == 24
    assert meta.training["run"]["best_epoch"] == 1
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
        assert not any(k.startswith("reconstruction.") for k in keys)
        assert f.get_tensor("encoder.blocks.0.0.weight").dtype == torch.float16
    # the node's loader runs it on Hounsfield units from a real CT
    p = Predictor(out, device="cpu", precision="fp32", batch_size=2)
    pred = p.predict_hu(_hu_slices(data_dir))
    assert pred.lesion_probability is not None and pred.lesion_probability.shape == (2, 512, 512)
    assert pred.slice_covid_probability is not None and pred.series_covid_probability is not None
    # the exported weights predict what the fp16-rounded source weights predict
    ref = Predictor.from_model(model.half().float(), src_meta, device="cpu", precision="fp32")
    x = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(
        p.predict_unit(x).slice_covid_probability,
        ref.predict_unit(x).slice_covid_probability,
        atol=1e-5,
    )


def test_export_refuses_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "o.safetensors")])
    assert rc == 2 and "file not found" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_shipped_release_checkpoint_loads_in_predictor(data_dir: Path) -> None:
    path = default_checkpoint_path()
    assert path.is_file(), f"release checkpoint missing at {path} (ctmtl-train export)"
    assert path.stat().st_size <= 70 * 1024 * 1024
    meta = read_metadata(path)
    assert meta.architecture.tasks == ["segmentation", "classification"]
    assert meta.weights_dtype == "float16"
    val = meta.metrics["validation"]
    assert 0.0 <= val["classification"]["auc"] <= 1.0 and val["classification"]["n"] == 118
    assert 0.0 <= val["segmentation"]["dice"] <= 1.0 and val["segmentation"]["n"] == 14
    assert meta.training["data"]["train"]
    p = Predictor(device="cpu", batch_size=2)  # found without arguments
    assert p.metadata.device_uid == meta.device_uid
    pred = p.predict_hu(_hu_slices(data_dir))
    assert pred.lesion_probability is not None
    assert (
        0.0 <= float(pred.lesion_probability.min()) <= float(pred.lesion_probability.max()) <= 1.0
    )
