"""The classifier's lung box: geometry, padding, and what the Predictor gives each head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_model import CheckpointMetadata, Predictor, build_model
from mtl_model.checkpoint import ArchitectureSpec, PreprocessingSpec
from mtl_model.preprocessing import crop_to_box, hu_to_unit, lung_box, resize_slices


def test_lung_box_is_the_lungs_extent_with_a_margin_in_a_centred_square() -> None:
    lung = np.zeros((3, 100, 120), bool)
    lung[1, 30:50, 20:100] = True  # 20 rows x 80 columns, on one slice only
    box = lung_box(lung, margin=0.1)
    assert box is not None
    assert box.content == (22, 58, 12, 108)  # grown by 8 (10 % of 80) on every side
    assert box.square == (-8, 88, 12, 108)  # 96 x 96, centred on the content
    assert lung_box(np.zeros((2, 5, 5), bool)) is None
    with pytest.raises(ValueError, match="expected a"):
        lung_box(np.zeros(5, bool))


def test_crop_pads_outside_the_image_and_blanks_outside_the_lungs() -> None:
    x = torch.arange(100.0).view(1, 10, 10)
    lung = np.zeros((10, 10), bool)
    lung[4:8, 2:5] = True
    box = lung_box(lung, margin=0.0)
    assert box is not None and box.content == (4, 8, 2, 5) and box.square == (4, 8, 1, 5)
    out = crop_to_box(x, box, fill=-1.0)
    assert out.shape == (1, 4, 4)
    assert (out[0, :, 0] == -1).all()  # column 1: in the square, outside the lungs' extent
    torch.testing.assert_close(out[0, :, 1:], x[0, 4:8, 2:5])
    edge = lung_box(np.pad(np.ones((2, 2), bool), ((0, 8), (0, 8))), margin=0.5)
    assert edge is not None and edge.square[0] < 0  # reaches above the image
    assert (crop_to_box(x, edge, fill=7.0)[0, 0] == 7.0).all()


def _box_predictor(classifier_input: str) -> tuple[Predictor, torch.nn.Module]:
    torch.manual_seed(0)
    net = build_model(
        "mtl", 4, 64, tasks=["segmentation", "classification"],
        classifier_pooling="image_cnn8", classifier_width=2,
    )  # fmt: skip
    with torch.no_grad():  # BatchNorm statistics of real-looking input, so outputs differ
        for _ in range(30):
            net(torch.rand(8, 1, 64, 64) * 0.6)
    net.eval()
    meta = CheckpointMetadata(
        architecture=ArchitectureSpec(
            base_width=4, input_size=64, tasks=["segmentation", "classification"],
            classifier_pooling="image_cnn8", classifier_width=2,
        ),
        preprocessing=PreprocessingSpec(input_size=64, classifier_input=classifier_input),
    )  # fmt: skip
    return Predictor.from_model(net, meta, device="cpu", precision="fp32"), net


def test_predictor_gives_the_classifier_the_series_lung_box() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(-500, 300, (4, 96, 96)).astype(np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[1:3, 20:60, 30:70] = True
    boxed, net = _box_predictor("lung_box")
    whole, _ = _box_predictor("slice")
    a = boxed.predict_hu(hu, lung_mask=lung)
    b = whole.predict_hu(hu, lung_mask=lung)
    assert net.classification is not None  # the caller's model keeps its classifier
    np.testing.assert_allclose(a.lesion_probability, b.lesion_probability, atol=1e-6)
    box = lung_box(lung)
    assert box is not None
    unit = hu_to_unit(torch.from_numpy(hu)).unsqueeze(1)
    air = float(hu_to_unit(torch.tensor(-1000.0)))
    with torch.no_grad():
        cut = resize_slices(crop_to_box(unit, box, air), 64)
        want = torch.sigmoid(net.classification(cut)["classification"]).numpy()
        full = torch.sigmoid(net.classification(resize_slices(unit, 64))["classification"])
    np.testing.assert_allclose(a.slice_covid_probability, want, atol=1e-5)
    np.testing.assert_allclose(b.slice_covid_probability, full.numpy(), atol=1e-5)
    assert not np.allclose(want, full.numpy(), atol=1e-4)  # the box changes what it sees
    # the series figure is taken over the slices with lung unless told otherwise
    assert a.series_covid_probability == pytest.approx(float(want[1:3].max()), abs=1e-6)
    # 2-D images without a lung mask: the whole slice, as in training on UCSD figures
    c = boxed.predict_unit(unit[:, 0].numpy())
    np.testing.assert_allclose(c.slice_covid_probability, full.numpy(), atol=1e-5)


def test_lung_box_needs_a_classifier_with_its_own_input() -> None:
    with pytest.raises(ValueError, match="needs a classifier with an input of its own"):
        CheckpointMetadata(
            architecture=ArchitectureSpec(base_width=4, input_size=64),
            preprocessing=PreprocessingSpec(input_size=64, classifier_input="lung_box"),
        )


def test_warm_up_runs_the_lesion_network_and_the_lung_box_classifier() -> None:
    """The blank batch at start goes through both networks, each with a full batch."""
    predictor, _ = _box_predictor("lung_box")
    seen: dict[str, list[int]] = {"model": [], "classifier": []}
    for name in seen:
        net = getattr(predictor, name)
        net.register_forward_hook(
            lambda m, args, out, name=name: seen[name].append(args[0].shape[0])
        )
    assert predictor.warm_up(rows=96, columns=96) > 0
    full = predictor.batch_size
    assert seen == {"model": [full], "classifier": [full]}
