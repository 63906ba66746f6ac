"""Fixtures for the processing half of the node: real series, tiny checkpoints, DICOM tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import torch

from mtl_model import CheckpointMetadata, Predictor, build_model, save_checkpoint
from mtl_model.checkpoint import ArchitectureSpec

COVID_SERIES = "ricord-1a-covid-chest-ct"
NONCOVID_SERIES = "lung-pet-ct-dx-a0002"
INFERENCE_TASKS = ["segmentation", "classification"]


@pytest.fixture(scope="session")
def covid_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / "dicom" / COVID_SERIES).glob("*.dcm"))
    assert len(files) == 255
    return files


@pytest.fixture(scope="session")
def noncovid_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / "dicom" / NONCOVID_SERIES).glob("*.dcm"))
    assert len(files) == 30
    return files


@pytest.fixture(scope="session")
def noncovid_headers(noncovid_files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in noncovid_files]


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mtl", base_width=4, input_size=256, tasks=INFERENCE_TASKS)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-4 random-weight checkpoint with the two inference heads."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    meta = CheckpointMetadata(
        architecture=ArchitectureSpec(base_width=4, tasks=INFERENCE_TASKS),
        model_version="0.0.0-test",
    )
    save_checkpoint(_tiny_model(0), meta, path)
    return path


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
        model = _tiny_model(1)
        with torch.no_grad():
            model.segmentation.head.weight.zero_()
            model.segmentation.head.bias.fill_(lesion_logit)
            model.classification.mlp[6].weight.zero_()
            model.classification.mlp[6].bias.fill_(covid_logit)
        path = tmp_path_factory.mktemp("const") / "const.safetensors"
        meta = CheckpointMetadata(
            architecture=ArchitectureSpec(base_width=4, tasks=INFERENCE_TASKS),
            model_version="0.0.0-const",
        )
        save_checkpoint(model, meta, path)
        return Predictor(checkpoint=path, device="cpu", precision="fp32")

    return make


def _tool(name: str) -> str:
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


@pytest.fixture(scope="session")
def dciodvfy_errors() -> Callable[[Path], list[str]]:
    """Run dicom3tools' dciodvfy on a file; return its "Error" lines (warnings are ok)."""
    exe = _tool("dciodvfy")

    def run(path: Path) -> list[str]:
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
        lines = (proc.stdout + proc.stderr).splitlines()
        return [line for line in lines if line.strip().startswith("Error")]

    return run


@pytest.fixture(scope="session")
def dcmqi_seg_to_itk() -> Callable[[Path, Path], list[Path]]:
    """Convert a SEG with dcmqi's segimage2itkimage; returns one NIfTI per segment."""
    exe = _tool("segimage2itkimage")

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
