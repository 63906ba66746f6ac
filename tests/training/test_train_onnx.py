"""``ctmtl-train export --onnx``: the inference heads as ONNX, equal to the torch network.

The ONNX file is run with ONNX's own reference evaluator (no OpenVINO, no torch in the
loop) and compared with the exported checkpoint run by torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_model import CheckpointMetadata, build_model, load_checkpoint, save_checkpoint
from training.cli import main

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'ctmtl[onnx]')")


def _checkpoint(path: Path, lung_box: bool) -> Path:
    torch.manual_seed(0)
    pooling = "image_cnn8" if lung_box else "max2x2_flatten"
    width = 4 if lung_box else None
    model = build_model("mtl", 4, 64, classifier_pooling=pooling, classifier_width=width)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    meta = CheckpointMetadata.model_validate(
        {
            "architecture": {
                "base_width": 4,
                "input_size": 64,
                "classifier_pooling": pooling,
                "classifier_width": width,
            },
            "preprocessing": {
                "input_size": 64,
                "classifier_input": "lung_box" if lung_box else "slice",
            },
        }
    )
    return save_checkpoint(model.eval(), meta, path)  # all three heads, T1 included


@pytest.mark.parametrize("lung_box", [False, True], ids=["encoder_head", "lung_box_cnn8"])
def test_export_writes_the_inference_heads_as_onnx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lung_box: bool
) -> None:
    from onnx.reference import ReferenceEvaluator

    src = _checkpoint(tmp_path / "src.safetensors", lung_box)
    out, onnx_path = tmp_path / "release.safetensors", tmp_path / "release.onnx"
    rc = main(
        [
            "export",
            "--checkpoint",
            str(src),
            "--out",
            str(out),
            "--no-eval",
            "--version",
            "0.1.0-test",
            "--device",
            "cpu",
            "--onnx",
            str(onnx_path),
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["onnx"] == str(onnx_path) and printed["onnx_bytes"] > 0

    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    inputs = [i.name for i in proto.graph.input]
    assert inputs == (["image", "classifier_image"] if lung_box else ["image"])
    assert [o.name for o in proto.graph.output] == ["lesion_probability", "covid_probability"]
    props = {p.key: p.value for p in proto.metadata_props}
    model, meta = load_checkpoint(out)
    described = CheckpointMetadata.model_validate_json(props["ctmtl"])
    assert described.device_uid == meta.device_uid and described.model_version == "0.1.0-test"
    assert described.architecture.tasks == ["segmentation", "classification"]

    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 64, 64), dtype=np.float32)  # batch 3: the batch axis is dynamic
    c = rng.random((3, 1, 64, 64), dtype=np.float32)
    feeds = {"image": x, "classifier_image": c} if lung_box else {"image": x}
    lesion, covid = ReferenceEvaluator(proto).run(None, feeds)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
        seg = torch.sigmoid(ref["segmentation"]).numpy()
        head = model.classification
        assert head is not None
        cls_logit = (
            head(torch.from_numpy(c))["classification"] if lung_box else ref["classification"]
        )
        cls = torch.sigmoid(cls_logit).numpy()
    assert lesion.shape == (3, 1, 64, 64) and covid.shape == (3,)
    np.testing.assert_allclose(lesion, seg, atol=1e-4)
    np.testing.assert_allclose(covid, cls, atol=1e-4)
