"""An 8-layer CNN classifier joined to an mtl network's lesion path (image_cnn8 T3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_model import CheckpointError, CheckpointMetadata, Predictor, build_model, load_checkpoint
from mtl_model.checkpoint import ArchitectureSpec, PreprocessingSpec, save_checkpoint
from training.export import compose_checkpoint


def _save(model: torch.nn.Module, path: Path, name: str, size: int = 64, box: bool = False) -> Path:
    meta = CheckpointMetadata(
        architecture=ArchitectureSpec(
            name=name, base_width=4, input_size=size, tasks=list(model.tasks)
        ),
        preprocessing=PreprocessingSpec(
            input_size=size, classifier_input="lung_box" if box else "slice"
        ),
        model_version=f"0.0.0-{name}",
    )
    return save_checkpoint(model, meta, path)


def test_image_cnn8_classifier_runs_on_the_slice() -> None:
    torch.manual_seed(0)
    net = build_model("mtl", 4, 64, classifier_pooling="image_cnn8", classifier_width=2).eval()
    cnn = build_model("cnn8", 2, 64).eval()
    cnn.load_state_dict(
        {k.removeprefix("classification."): v for k, v in net.state_dict().items()
         if k.startswith("classification.")}
    )  # fmt: skip
    x = torch.rand(3, 1, 64, 64)
    out = net(x)
    torch.testing.assert_close(out["classification"], cnn(x)["classification"])
    assert out["segmentation"].shape == (3, 1, 64, 64)
    keys = net.state_dict().keys()
    assert "classification.mlp.3.weight" in keys  # the 8-layer CNN's Dense 1, not T3's
    assert "classification.mlp.6.weight" not in keys
    with pytest.raises(ValueError, match="classifier_width applies"):
        build_model("mtl", 4, 64, classifier_width=2)


def test_compose_keeps_both_sources_exactly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    mtl = build_model("mtl", 4, 64, tasks=["segmentation", "classification"]).eval()
    cnn = build_model("cnn8", 4, 64).eval()
    seg_path = _save(mtl, tmp_path / "mtl.safetensors", "mtl")
    cls_path = _save(cnn, tmp_path / "cnn.safetensors", "cnn8", box=True)
    out = compose_checkpoint(seg_path, cls_path, tmp_path / "both.safetensors")
    model, meta = load_checkpoint(out)
    assert meta.architecture.classifier_pooling == "image_cnn8"
    assert meta.architecture.classifier_width == 4
    assert meta.preprocessing.classifier_input == "lung_box"  # the classifier's own input
    composed = meta.training["composed"]
    assert composed["classification"]["model_version"] == "0.0.0-cnn8"
    assert composed["encoder_and_segmentation"]["model_version"] == "0.0.0-mtl"
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        got = model(x)
        torch.testing.assert_close(got["segmentation"], mtl(x)["segmentation"], rtol=0, atol=0)
        torch.testing.assert_close(got["classification"], cnn(x)["classification"], rtol=0, atol=0)
    # the node's predictor (BatchNorm folded) reads it like any release; 2-D images
    # without a lung mask reach the classifier whole
    pred = Predictor(out, device="cpu", precision="fp32").predict_unit(x[:, 0].numpy())
    assert pred.slice_covid_probability is not None
    expect = torch.sigmoid(cnn(x)["classification"]).detach().numpy()
    assert pred.slice_covid_probability == pytest.approx(expect, abs=1e-5)
    # a composed checkpoint gives its classifier to the next composition too
    again = compose_checkpoint(seg_path, out, tmp_path / "again.safetensors")
    assert load_checkpoint(again)[1].architecture == meta.architecture

    other = _save(build_model("cnn8", 4, 128).eval(), tmp_path / "c128.safetensors", "cnn8", 128)
    with pytest.raises(CheckpointError, match="takes 128x128 slices"):
        compose_checkpoint(seg_path, other, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="holds no 8-layer CNN"):
        compose_checkpoint(seg_path, seg_path, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not an mtl checkpoint with a lesion decoder"):
        compose_checkpoint(cls_path, cls_path, tmp_path / "x.safetensors")
