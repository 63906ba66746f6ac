"""Fixtures for the processing half of the node: tiny predictors, dcmqi. The real series,
the tiny checkpoint and dciodvfy are shared (tests/conftest.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers import find_tool, save_tiny_checkpoint, tiny_model
from mtl_model import Predictor


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor(checkpoint=tiny_checkpoint, device="cpu", batch_size=16)


@pytest.fixture(scope="session")
def constant_predictor_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[float, float], Predictor]:
    """A real Predictor whose heads output fixed logits: the lesion map and the COVID
    probability are known in advance (zero weights, chosen biases), so the node's
    thresholding, lung restriction and reported numbers can be checked exactly."""

    def make(lesion_logit: float, covid_logit: float) -> Predictor:
        model = tiny_model(1)
        with torch.no_grad():
            model.segmentation.head.weight.zero_()
            model.segmentation.head.bias.fill_(lesion_logit)
            model.classification.mlp[6].weight.zero_()
            model.classification.mlp[6].bias.fill_(covid_logit)
        path = tmp_path_factory.mktemp("const") / "const.safetensors"
        save_tiny_checkpoint(model, path, model_version="0.0.0-const")
        return Predictor(checkpoint=path, device="cpu", precision="fp32")

    return make


@pytest.fixture(scope="session")
def dcmqi_seg_to_itk() -> Callable[[Path, Path], list[Path]]:
    """Convert a SEG with dcmqi's segimage2itkimage; returns one NIfTI per segment."""
    exe = find_tool("segimage2itkimage")

    def run(seg_path: Path, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [
                exe,
                "--inputDICOM",
                str(seg_path),
                "--outputDirectory",
                str(out_dir),
                "--outputType",
                "nii",
                "--prefix",
                "seg",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return sorted(out_dir.glob("seg-*.nii.gz"), key=lambda p: int(p.name[4:-7]))

    return run
