"""Self-describing checkpoints: one safetensors file whose header carries the metadata.

A checkpoint must be loadable by the node years later without the training code and
without trusting the file: safetensors holds only tensors (nothing is unpickled), and the
JSON metadata in its header (key ``ctmtl``) says how to build the network, how to
preprocess, what the outputs mean and where the weights came from. Loading checks the
format, the metadata, and every tensor name and shape against the network the metadata
describes, and reports any problem as one :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mtl_model.network import (
    ARCHITECTURES,
    PAPER_POOLING,
    TASKS,
    ClassifierPooling,
    build_model,
    canonical_tasks,
    model_tasks,
)
from mtl_model.preprocessing import LUNG_BOX_MARGIN

logger = logging.getLogger(__name__)

FORMAT_NAME = "ctmtl-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "ctmtl"
RELEASE_FILENAME = "ctmtl-release.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and the file."""


class Code(BaseModel):
    """A coded concept (DICOM style: value, scheme, meaning)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    value: str
    scheme: str
    meaning: str


class ArchitectureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["mtl", "unet", "cnn8"] = "mtl"
    base_width: int = Field(64, ge=1)
    input_size: int = Field(256, ge=32)
    in_channels: int = Field(1, ge=1)
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))
    # T3 head: the paper's 2x2 max-pool + flatten, or global average pooling (mtl only).
    # Checkpoints written before this field existed have the paper's head.
    classifier_pooling: ClassifierPooling = PAPER_POOLING
    # "image_cnn8" only: base width of that classifier (None = base_width).
    classifier_width: int | None = Field(None, ge=1)
    # "image_cnn8" only: that many CNN8s averaged, and each slice's mirror with them
    # (mtl_model.network). Older checkpoints have one CNN8 and no mirror.
    classifier_members: int = Field(1, ge=1)
    classifier_flip: bool = False

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        canonical_tasks(v)  # validation only: a stored order is kept as written
        return v

    def build(self, tasks: list[str] | None = None) -> nn.Module:
        """The network this spec describes (optionally with only some of its heads)."""
        return build_model(
            self.name,
            self.base_width,
            self.input_size,
            self.in_channels,
            self.tasks if tasks is None else tasks,
            self.classifier_pooling,
            self.classifier_width,
            self.classifier_members,
            self.classifier_flip,
        )


class PreprocessingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_size: int = 256
    hu_window_center: float = -600.0
    hu_window_width: float = Field(1500.0, gt=0)
    image_scale: str = "uint8 / 255"
    resize: str = "bilinear, antialiased when downsampling"
    # what the classifier sees of a slice: all of it, or the series' lung box (the margin
    # a fraction of the lungs' extent; mtl_model.preprocessing.lung_box)
    classifier_input: Literal["slice", "lung_box"] = "slice"
    lung_box_margin: float = Field(LUNG_BOX_MARGIN, ge=0, le=1)


class LabelSpec(BaseModel):
    """What the heads' outputs mean, as codes the DICOM writers reuse."""

    model_config = ConfigDict(extra="forbid")
    classification_positive: Code = Code(value="840539006", scheme="SCT", meaning="COVID-19")
    segmentation_lesion: Code = Code(value="52988006", scheme="SCT", meaning="Lesion")
    segmentation_category: Code = Code(
        value="49755003", scheme="SCT", meaning="Morphologically Altered Structure"
    )
    threshold: float = Field(0.5, gt=0, lt=1)


class CheckpointMetadata(BaseModel):
    """Everything the node needs to know about a set of weights."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["ctmtl-checkpoint"] = "ctmtl-checkpoint"
    format_version: int = FORMAT_VERSION
    architecture: ArchitectureSpec = Field(default_factory=ArchitectureSpec)
    preprocessing: PreprocessingSpec = Field(default_factory=PreprocessingSpec)
    labels: LabelSpec = Field(default_factory=LabelSpec)
    model_name: str = "ctmtl Amyar-2020 multi-task network"
    model_version: str = "0.0.0"
    device_uid: str = Field(default_factory=lambda: new_device_uid())
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    weights_dtype: str = "float32"
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    notes: str = ""

    @model_validator(mode="after")
    def _classifier_input(self) -> CheckpointMetadata:
        if (
            self.preprocessing.classifier_input == "lung_box"
            and self.architecture.classifier_pooling != "image_cnn8"
            and self.architecture.name != "cnn8"
        ):
            raise ValueError(
                "preprocessing.classifier_input 'lung_box' needs a classifier with an input "
                "of its own (architecture cnn8, or classifier_pooling 'image_cnn8')"
            )
        return self

    @field_validator("format_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is not supported (this code reads {FORMAT_VERSION})"
            )
        return v

    @field_validator("device_uid")
    @classmethod
    def _uid(cls, v: str) -> str:
        parts = v.split(".")
        if len(v) > 64 or not all(
            p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts
        ):
            raise ValueError(f"device_uid {v!r} is not a valid DICOM UID")
        return v


def new_device_uid() -> str:
    """A fresh UUID-derived UID (2.25.<uuid>): every newly trained checkpoint gets its own."""
    return f"2.25.{uuid.uuid4().int}"


def default_checkpoint_path() -> Path:
    """The shipped release checkpoint, or the file named by env ``CTMTL_CHECKPOINT``."""
    env = os.environ.get("CTMTL_CHECKPOINT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "weights" / RELEASE_FILENAME


def save_checkpoint(
    model: nn.Module,
    metadata: CheckpointMetadata,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    tasks: list[str] | None = None,
) -> Path:
    """Write ``model`` (optionally only some heads, e.g. inference heads) atomically."""
    path = Path(path)
    present = list(model_tasks(model))
    keep = tasks if tasks is not None else present
    missing = [t for t in keep if t not in present]
    if missing:
        raise ValueError(f"model has no head for {missing}")
    dropped = [t for t in present if t not in keep]
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if any(name.startswith(f"{t}.") for t in dropped):
            continue
        t = tensor.detach().to("cpu")
        if t.is_floating_point() and not name.endswith("num_batches_tracked"):
            t = t.to(dtype)
        state[name] = t.contiguous()
    arch = metadata.architecture.model_copy(update={"tasks": keep})
    meta = metadata.model_copy(
        update={
            "architecture": arch,
            "weights_dtype": str(dtype).removeprefix("torch."),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: meta.model_dump_json()})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # readable like any other file, e.g. by the node's user
    os.replace(tmp, path)
    logger.info("saved checkpoint %s (%s, heads %s, %s)", path, meta.model_version, keep, dtype)
    return path


def read_metadata(path: str | Path) -> CheckpointMetadata:
    """Read and validate only the metadata (cheap: the header)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: not a readable safetensors file ({exc})"
        ) from exc
    if raw is None:
        raise CheckpointError(
            f"checkpoint {path}: no '{METADATA_KEY}' metadata; not a ctmtl checkpoint"
        )
    try:
        return CheckpointMetadata.model_validate(json.loads(raw))
    except (json.JSONDecodeError, ValidationError) as exc:
        detail = str(exc).replace("\n", "; ")
        raise CheckpointError(f"checkpoint {path}: invalid metadata: {detail}") from exc


def load_checkpoint(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMetadata]:
    """Build the network the metadata describes and load the weights into it (float32)."""
    path = Path(path) if path is not None else default_checkpoint_path()
    meta = read_metadata(path)
    arch = meta.architecture
    if arch.name not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint {path}: unknown architecture {arch.name!r}")
    try:
        model = arch.build()
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot build the network: {exc}") from exc
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            extra = sorted(names - set(expected))
            if missing or extra:
                raise CheckpointError(
                    f"checkpoint {path}: weights do not match the described network "
                    f"({len(missing)} missing, e.g. {missing[:3]}; {len(extra)} unexpected, "
                    f"e.g. {extra[:3]})"
                )
            state = {}
            for name in names:
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise CheckpointError(
                        f"checkpoint {path}: tensor {name} has shape {tuple(t.shape)}, the "
                        f"described network needs {tuple(expected[name].shape)}"
                    )
                state[name] = t.to(expected[name].dtype)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: weights unreadable ({exc})") from exc
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    logger.info(
        "loaded checkpoint %s: %s %s width %d, heads %s, device UID %s",
        path,
        meta.model_name,
        meta.model_version,
        arch.base_width,
        arch.tasks,
        meta.device_uid,
    )
    return model, meta
