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
            name=name, base_width=model.base_width, input_size=size, tasks=list(model.tasks)
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
    with pytest.raises(CheckpointError, match="holds no single 8-layer CNN"):
        compose_checkpoint(seg_path, seg_path, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not an mtl checkpoint with a lesion decoder"):
        compose_checkpoint(cls_path, cls_path, tmp_path / "x.safetensors")


def test_compose_averages_several_classifiers_and_the_mirror(tmp_path: Path) -> None:
    """An ensemble T3 is the mean logit of its members over the slice and its mirror, reads
    back through the Predictor, and refuses members that do not fit together."""
    torch.manual_seed(2)
    mtl = build_model("mtl", 4, 64, tasks=["segmentation", "classification"]).eval()
    seg_path = _save(mtl, tmp_path / "mtl.safetensors", "mtl")
    cnns = [build_model("cnn8", 4, 64).eval() for _ in range(3)]
    paths = [
        _save(c, tmp_path / f"cnn{i}.safetensors", "cnn8", box=True) for i, c in enumerate(cnns)
    ]
    out = compose_checkpoint(seg_path, paths, tmp_path / "ens.safetensors", flip=True)
    model, meta = load_checkpoint(out)
    arch = meta.architecture
    assert (arch.classifier_members, arch.classifier_flip, arch.classifier_width) == (3, True, 4)
    assert len(meta.training["composed"]["classification"]) == 3
    assert meta.model_version.endswith("+3x0.0.0-cnn8+flip")
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        views = [c(v)["classification"] for c in cnns for v in (x, x.flip(-1))]
        expect = torch.stack(views).mean(0)
        got = model(x)
        torch.testing.assert_close(got["classification"], expect, rtol=0, atol=1e-6)
        torch.testing.assert_close(got["segmentation"], mtl(x)["segmentation"], rtol=0, atol=0)
        # the mirror matters: a classifier that is not mirror-symmetric changes its mean
        plain = torch.stack([c(x)["classification"] for c in cnns]).mean(0)
        assert not torch.allclose(plain, expect)
    pred = Predictor(out, device="cpu", precision="fp32").predict_unit(x[:, 0].numpy())
    assert pred.slice_covid_probability == pytest.approx(torch.sigmoid(expect).numpy(), abs=1e-5)
    wide = _save(build_model("cnn8", 8, 64).eval(), tmp_path / "w8.safetensors", "cnn8", box=True)
    with pytest.raises(CheckpointError, match="different widths"):
        compose_checkpoint(seg_path, [paths[0], wide], tmp_path / "x.safetensors")
    whole = _save(cnns[0], tmp_path / "whole.safetensors", "cnn8", box=False)
    with pytest.raises(CheckpointError, match="another classifier input"):
        compose_checkpoint(seg_path, [paths[0], whole], tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="holds no single 8-layer CNN"):
        compose_checkpoint(seg_path, [out], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="classifier_members applies"):
        build_model("mtl", 4, 64, classifier_members=2)


def test_a_cnn8_fine_tunes_from_a_composed_release(
    mini_data: Path, tmp_path: Path, tiny_config
) -> None:
    """init_from a release whose T3 is one 8-layer CNN starts a cnn8 run from that CNN."""
    from training.trainer import fit

    torch.manual_seed(4)
    mtl = build_model("mtl", 4, 64, tasks=["segmentation", "classification"]).eval()
    cnn = build_model("cnn8", 4, 64).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        cnn.train()(torch.rand(8, 1, 64, 64))
    seg_path = _save(mtl, tmp_path / "mtl.safetensors", "mtl")
    release = compose_checkpoint(
        seg_path, _save(cnn.eval(), tmp_path / "cnn.safetensors", "cnn8", box=True),
        tmp_path / "release.safetensors",
    )  # fmt: skip
    cfg = tiny_config(
        model={"architecture": "cnn8", "base_width": 4, "input_size": 64,
               "tasks": ["classification"], "classifier_input": "lung_box"},
        train={"epochs": 1, "max_steps_per_epoch": 1, "lr": 1e-12, "init_from": str(release),
               "freeze_batchnorm": True},
    )  # fmt: skip
    fit(cfg, tmp_path / "ft", mini_data, progress=False)
    last = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)["model"]
    for k, v in cnn.state_dict().items():
        torch.testing.assert_close(last[k], v, rtol=0, atol=1e-6, msg=k)
    # an mtl checkpoint without a CNN8 classifier has nothing for a cnn8 network
    other = cfg.train.model_copy(update={"init_from": str(seg_path)})
    with pytest.raises(RuntimeError, match="no weights in common"):
        fit(cfg.model_copy(update={"train": other}), tmp_path / "none", mini_data, progress=False)
