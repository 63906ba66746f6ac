"""The paper's network and baselines: shapes, dtypes, gradients, head selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtl_model import CNN8, MTLNet, UNet, build_model, model_tasks


def test_heads_shapes_and_dtypes() -> None:
    model = MTLNet(base_width=4, input_size=64)
    x = torch.rand(3, 1, 64, 64)
    out = model(x)
    assert set(out) == {"reconstruction", "segmentation", "classification"}
    assert out["reconstruction"].shape == (3, 1, 64, 64)
    assert out["segmentation"].shape == (3, 1, 64, 64)
    assert out["classification"].shape == (3,)
    assert all(t.dtype == torch.float32 for t in out.values())


def test_paper_width_feature_maps() -> None:
    model = MTLNet(base_width=64, input_size=256, tasks=["segmentation"])
    assert model.encoder.widths == [64, 128, 256, 512, 1024]
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 10  # the paper's "10 conv layers"


def test_bottleneck_resolution() -> None:
    model = MTLNet(base_width=4, input_size=256, tasks=["classification"])
    _, bottleneck = model.encoder(torch.rand(1, 1, 256, 256))
    assert bottleneck.shape == (1, 64, 16, 16)


def test_inference_model_has_no_reconstruction_decoder() -> None:
    model = build_model("mtl", 4, 64, tasks=["segmentation", "classification"])
    assert model.reconstruction is None  # type: ignore[union-attr]
    assert not any(n.startswith("reconstruction.") for n in model.state_dict())
    assert set(model(torch.rand(1, 1, 64, 64))) == {"segmentation", "classification"}


def test_gradients_reach_encoder_from_each_loss() -> None:
    torch.manual_seed(0)
    model = MTLNet(base_width=4, input_size=64)
    x = torch.rand(2, 1, 64, 64)
    target_mask = (torch.rand(2, 1, 64, 64) > 0.5).float()
    labels = torch.tensor([0.0, 1.0])
    first_conv = model.encoder.blocks[0][0].weight
    losses = {
        "reconstruction": lambda o: F.mse_loss(o["reconstruction"], x),
        "segmentation": lambda o: (
            -(
                (2 * (torch.sigmoid(o["segmentation"]) * target_mask).sum() + 1)
                / (torch.sigmoid(o["segmentation"]).sum() + target_mask.sum() + 1)
            )
        ),
        "classification": lambda o: F.binary_cross_entropy_with_logits(o["classification"], labels),
    }
    for task, loss_fn in losses.items():
        model.zero_grad()
        model.train()
        loss_fn(model(x)).backward()
        grad = first_conv.grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient from the {task} loss"
        head = getattr(model, task)
        other = [getattr(model, t) for t in ("reconstruction", "segmentation", "classification")]
        for module in other:
            if module is not head:
                assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())


def test_baselines() -> None:
    unet = UNet(base_width=4, input_size=64)
    assert model_tasks(unet) == ("segmentation",)
    assert unet(torch.rand(2, 1, 64, 64))["segmentation"].shape == (2, 1, 64, 64)
    cnn = CNN8(base_width=4, input_size=64)
    weighted = [m for m in cnn.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(weighted) == 8
    assert cnn(torch.rand(2, 1, 64, 64))["classification"].shape == (2,)


def test_global_average_classifier_head() -> None:
    torch.manual_seed(0)
    paper = build_model("mtl", 4, 64)
    gap = build_model("mtl", 4, 64, classifier_pooling="global_average")
    assert paper.classification is not None and gap.classification is not None
    # same tensor names (pooling holds no weights); only Dense 128's input width differs
    assert paper.state_dict().keys() == gap.state_dict().keys()
    assert paper.classification.mlp[0].in_features == 8 * 2 * 2
    assert gap.classification.mlp[0].in_features == 8
    # the global head does not depend on the bottleneck size
    assert build_model("mtl", 4, 128, classifier_pooling="global_average").state_dict()[
        "classification.mlp.0.weight"
    ].shape == (128, 8)
    out = gap.eval()(torch.rand(3, 1, 64, 64))
    assert out["classification"].shape == (3,)
    assert out["segmentation"].shape == (3, 1, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classifier_pooling": "median"}, "unknown classifier_pooling"),
        (
            {
                "architecture": "cnn8",
                "tasks": ["classification"],
                "classifier_pooling": "global_average",
            },
            "architecture 'mtl' only",
        ),
        ({"architecture": "resnet"}, "unknown architecture"),
        ({"tasks": ["denoise"]}, "tasks must be"),
        ({"input_size": 100}, "multiple of 32"),
        ({"architecture": "unet", "tasks": ["classification"]}, "segmentation task only"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"base_width": 4, "input_size": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_model(**args)  # type: ignore[arg-type]
