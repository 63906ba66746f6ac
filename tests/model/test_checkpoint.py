"""Checkpoint round trip and the clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtl_model import (
    CheckpointError,
    CheckpointMetadata,
    build_model,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from mtl_model.checkpoint import METADATA_KEY


def _meta(width: int = 4, size: int = 64, **extra: object) -> CheckpointMetadata:
    return CheckpointMetadata.model_validate(
        {
            "architecture": {"base_width": width, "input_size": size},
            "preprocessing": {"input_size": size},
            "model_version": "1.2.3",
            "training": {"covid_ct_train": 423},
            "metrics": {"auc": 0.5},
            **extra,
        }
    )


def _perturbed_model() -> torch.nn.Module:
    torch.manual_seed(1)
    model = build_model("mtl", 4, 64)
    for m in model.modules():  # non-trivial BatchNorm statistics must survive the trip
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_round_trip_identical_outputs(tmp_path: Path) -> None:
    model = _perturbed_model()
    meta = _meta()
    path = save_checkpoint(model, meta, tmp_path / "m.safetensors")
    loaded, meta2 = load_checkpoint(path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert meta2.device_uid == meta.device_uid
    assert meta2.model_version == "1.2.3"
    assert meta2.training == {"covid_ct_train": 423}
    assert meta2.architecture.tasks == ["reconstruction", "segmentation", "classification"]


def test_export_inference_heads_fp16(tmp_path: Path) -> None:
    model = _perturbed_model()
    path = save_checkpoint(
        model,
        _meta(),
        tmp_path / "inf.safetensors",
        dtype=torch.float16,
        tasks=["segmentation", "classification"],
    )
    loaded, meta = load_checkpoint(path)
    assert meta.weights_dtype == "float16"
    assert meta.architecture.tasks == ["segmentation", "classification"]
    assert loaded.reconstruction is None  # type: ignore[union-attr]
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.allclose(
        torch.sigmoid(a["segmentation"]), torch.sigmoid(b["segmentation"]), atol=1e-2
    )


def test_every_new_metadata_gets_a_new_device_uid() -> None:
    a, b = CheckpointMetadata(), CheckpointMetadata()
    assert a.device_uid != b.device_uid
    assert a.device_uid.startswith("2.25.") and len(a.device_uid) <= 64


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path: Path) -> None:
    path = save_checkpoint(_perturbed_model(), _meta(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.safetensors"):
        load_checkpoint(path)


def test_garbage_and_pickle_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_perturbed_model().state_dict(), path)  # a pickle: never loaded
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_plain_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a ctmtl checkpoint"):
        load_checkpoint(path)


def test_mismatched_architecture(tmp_path: Path) -> None:
    model = _perturbed_model()
    path = tmp_path / "m.safetensors"
    wrong = _meta(width=8)  # the metadata lies about the width
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={METADATA_KEY: wrong.model_dump_json()})
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(path)


def test_classifier_pooling_is_part_of_the_architecture(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = build_model("mtl", 4, 64, classifier_pooling="global_average").eval()
    meta = _meta(
        architecture={"base_width": 4, "input_size": 64, "classifier_pooling": "global_average"}
    )
    path = save_checkpoint(model, meta, tmp_path / "gap.safetensors")
    loaded, meta2 = load_checkpoint(path)
    assert meta2.architecture.classifier_pooling == "global_average"
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["classification"], loaded(x)["classification"])
    # metadata without the field (checkpoints written before it existed) means the paper head
    assert _meta().architecture.classifier_pooling == "max2x2_flatten"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    lying = tmp_path / "lying.safetensors"
    save_file(state, str(lying), metadata={METADATA_KEY: _meta().model_dump_json()})
    with pytest.raises(CheckpointError, match=r"classification\.mlp\.0\.weight has shape"):
        load_checkpoint(lying)


def test_missing_tensors(tmp_path: Path) -> None:
    model = _perturbed_model()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classification.")}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={METADATA_KEY: _meta().model_dump_json()})
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"format_version": 99}, "format_version 99 is not supported"),
        ({"architecture": {"name": "vit"}}, "architecture"),
        ({"device_uid": "1.2.abc"}, "not a valid DICOM UID"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_metadata(tmp_path: Path, patch: dict[str, object], message: str) -> None:
    raw = json.loads(_meta().model_dump_json())
    raw.update(patch)
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={METADATA_KEY: json.dumps(raw)})
    with pytest.raises(CheckpointError, match=message):
        read_metadata(path)


def test_saved_file_is_readable_by_others(tmp_path: Path) -> None:
    path = save_checkpoint(_perturbed_model(), _meta(), tmp_path / "m.safetensors")
    assert path.stat().st_mode & 0o044 == 0o044  # the node often runs as another user
