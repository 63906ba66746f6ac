"""Predictor: equals a direct model call, batching-invariant, back on the source grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_model import (
    CheckpointMetadata,
    Predictor,
    build_model,
    hu_to_unit,
    resize_slices,
    uint8_to_unit,
)
from mtl_model.predictor import ACCELERATOR_BATCH, CPU_BATCH
from mtl_model.preprocessing import LUNG_WINDOW


def _model_and_meta(width: int = 4, size: int = 64) -> tuple[torch.nn.Module, CheckpointMetadata]:
    torch.manual_seed(0)
    model = build_model("mtl", width, size, tasks=["segmentation", "classification"]).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    meta = CheckpointMetadata.model_validate(
        {
            "architecture": {
                "base_width": width,
                "input_size": size,
                "tasks": ["segmentation", "classification"],
            },
            "preprocessing": {"input_size": size},
        }
    )
    return model, meta


def test_lung_window() -> None:
    hu = torch.tensor([-2000.0, LUNG_WINDOW.low, -600.0, LUNG_WINDOW.high, 3000.0])
    assert torch.allclose(hu_to_unit(hu), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.equal(uint8_to_unit(np.array([0, 255], dtype=np.uint8)), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError):
        uint8_to_unit(np.array([0.5]))


def test_equals_direct_model_call() -> None:
    model, meta = _model_and_meta()
    rng = np.random.default_rng(0)
    vol = rng.integers(-1100, 300, size=(5, 96, 80)).astype(np.int16)
    pred = Predictor.from_model(model, meta, device="cpu", precision="fp32").predict_hu(vol)
    with torch.no_grad():
        x = resize_slices(hu_to_unit(torch.from_numpy(vol)).unsqueeze(1), 64)
        out = model(x)
        seg = resize_slices(torch.sigmoid(out["segmentation"]), (96, 80))[:, 0].numpy()
        cls = torch.sigmoid(out["classification"]).numpy()
    assert pred.lesion_probability is not None and pred.slice_covid_probability is not None
    assert pred.lesion_probability.shape == (5, 96, 80)
    assert pred.lesion_probability.dtype == np.float32
    np.testing.assert_allclose(pred.lesion_probability, seg, atol=1e-5)
    np.testing.assert_allclose(pred.slice_covid_probability, cls, atol=1e-5)
    assert pred.series_covid_probability == pytest.approx(float(np.sort(cls)[-1:].mean()))


def test_lesion_threshold_gives_the_thresholded_map() -> None:
    """The mask thresholded where the network ran (what the node asks for) is the
    probability map thresholded afterwards, batch by batch, with the same COVID figures."""
    model, meta = _model_and_meta()
    rng = np.random.default_rng(2)
    vol = rng.integers(-1100, 300, size=(7, 96, 80)).astype(np.int16)
    p = Predictor.from_model(model, meta, device="cpu", precision="fp32", batch_size=3)
    full = p.predict_hu(vol)
    assert full.lesion_probability is not None and full.lesion_mask is None
    level = float(np.median(full.lesion_probability))  # a level that splits the map
    masked = p.predict_hu(vol, lesion_threshold=level)
    assert masked.lesion_probability is None and masked.lesion_mask is not None
    assert masked.lesion_mask.dtype == np.bool_ and masked.lesion_mask.shape == (7, 96, 80)
    np.testing.assert_array_equal(masked.lesion_mask, full.lesion_probability >= level)
    assert 0 < masked.lesion_mask.mean() < 1
    np.testing.assert_array_equal(masked.slice_covid_probability, full.slice_covid_probability)  # type: ignore[arg-type]
    assert masked.series_covid_probability == full.series_covid_probability


def test_batched_equals_unbatched() -> None:
    model, meta = _model_and_meta()
    vol = np.random.default_rng(1).random((7, 64, 64)).astype(np.float32)
    one = Predictor.from_model(model, meta, device="cpu", precision="fp32", batch_size=1)
    many = Predictor.from_model(model, meta, device="cpu", precision="fp32", batch_size=4)
    a, b = one.predict_unit(vol), many.predict_unit(vol)
    assert a.lesion_probability is not None and b.lesion_probability is not None
    np.testing.assert_allclose(a.lesion_probability, b.lesion_probability, atol=1e-5)
    np.testing.assert_allclose(a.slice_covid_probability, b.slice_covid_probability, atol=1e-5)  # type: ignore[arg-type]


def test_batch_size_defaults_to_the_cpus_small_batch() -> None:
    """Unset, the batch is `CPU_BATCH` on a CPU (as fast as 16 there, with less memory);
    a set value wins."""
    model, meta = _model_and_meta()
    assert Predictor.from_model(model, meta, device="cpu").batch_size == CPU_BATCH == 2
    assert Predictor.from_model(model, meta, device="cpu", batch_size=16).batch_size == 16
    assert ACCELERATOR_BATCH == 16
    with pytest.raises(ValueError, match="batch_size"):
        Predictor.from_model(model, meta, device="cpu", batch_size=0)


def test_bf16_agrees_with_fp32() -> None:
    model, meta = _model_and_meta()
    vol = np.random.default_rng(2).integers(-1000, 200, size=(4, 128, 128)).astype(np.int16)
    a = Predictor.from_model(model, meta, device="cpu", precision="fp32").predict_hu(vol)
    b = Predictor.from_model(model, meta, device="cpu", precision="bf16").predict_hu(vol)
    assert a.lesion_probability is not None and b.lesion_probability is not None
    assert np.abs(a.lesion_probability - b.lesion_probability).max() < 0.05


def test_blob_keeps_position_and_size_on_source_grid() -> None:
    # A model-free check of the resize round trip the predictor uses: a blob drawn on a
    # 512x400 source grid, taken to the network grid and back, thresholded at 0.5.
    src = torch.zeros(1, 1, 512, 400)
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(400), indexing="ij")
    blob = ((yy - 300) ** 2 + (xx - 120) ** 2) < 40**2
    src[0, 0][blob] = 1.0
    down = resize_slices(src, 64)
    back = resize_slices(down, (512, 400))[0, 0] >= 0.5
    assert back.shape == (512, 400)
    iou = (back & blob).sum() / (back | blob).sum()
    assert iou > 0.9
    cy, cx = (torch.nonzero(back).float().mean(0)).tolist()
    assert abs(cy - 300) < 2 and abs(cx - 120) < 2


def test_predictor_output_blob_position() -> None:
    # End-to-end through the predictor: a segmentation head forced to echo its input
    # (identity-like logits) must put the blob where it was on the source grid.
    _, meta = _model_and_meta()

    class Echo(torch.nn.Module):
        tasks = ("segmentation", "classification")

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"segmentation": (x - 0.5) * 50, "classification": x.mean((1, 2, 3))}

    vol = np.full((3, 300, 200), -1000, dtype=np.int16)
    vol[1, 100:160, 40:90] = 150  # bright rectangle on the middle slice only
    pred = Predictor.from_model(Echo(), meta, device="cpu", precision="fp32").predict_hu(vol)
    assert pred.lesion_probability is not None
    mask = pred.lesion_probability >= 0.5
    assert not mask[0].any() and not mask[2].any()
    ys, xs = np.nonzero(mask[1])
    assert abs(ys.min() - 100) <= 3 and abs(ys.max() - 159) <= 3
    assert abs(xs.min() - 40) <= 3 and abs(xs.max() - 89) <= 3


def test_series_aggregation() -> None:
    probs = np.array([0.1] * 18 + [0.9, 0.7])
    assert Predictor.aggregate_series(probs) == pytest.approx(0.8)  # top 10% = 2 slices
    mask = np.array([False] * 10 + [True] * 10)
    assert Predictor.aggregate_series(probs, mask) == pytest.approx(0.9)  # top 1 of 10
    assert Predictor.aggregate_series(probs, np.zeros(20, bool)) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        Predictor.aggregate_series(np.array([]))


def test_bad_input_and_options() -> None:
    model, meta = _model_and_meta()
    p = Predictor.from_model(model, meta, device="cpu", precision="fp32")
    with pytest.raises(ValueError, match="volume"):
        p.predict_hu(np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="precision"):
        Predictor.from_model(model, meta, precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            Predictor.from_model(model, meta, device="cuda")
