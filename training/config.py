"""Experiment configuration: one TOML file per experiment, validated by pydantic.

A config names the network (passed to ``mtl_model.build_model``), the data sets for
training and validation (folder formats as in ../shared/data), the loss weights, the
optimiser and the augmentation. Relative data paths are resolved against the data root
(``--data``, else env ``CTMTL_DATA``, else ``../shared/data`` beside the repository), so the
same file works on a laptop, in CI and on a GPU machine.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtl_model import TASKS
from mtl_model.network import PAPER_POOLING, ClassifierPooling, canonical_tasks

# re-exported: training's callers find them here
from mtl_model.stacks import REPO_ROOT as REPO_ROOT
from mtl_model.stacks import default_data_root as default_data_root

DatasetKind = Literal["covid_ct", "medseg_png", "medseg_nifti", "dicom_seg", "png_stack"]
Split = Literal["train", "val", "test", "all"]


class ConfigError(ValueError):
    """A configuration file that cannot be used, with the file and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Arguments of ``mtl_model.build_model``."""

    architecture: Literal["mtl", "unet", "cnn8"] = "mtl"
    base_width: int = Field(64, ge=1)
    input_size: int = Field(256, ge=32)
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))
    # T3 head of the mtl network: the paper's "max2x2_flatten", "global_average", or
    # "image_cnn8" (the 8-layer CNN on the input slice, of width classifier_width).
    classifier_pooling: ClassifierPooling = PAPER_POOLING
    classifier_width: int | None = Field(None, ge=1)
    # "lung_box": the classifier sees each real-CT slice cut to its series' lung box, as
    # the node's Predictor cuts it (mtl_model.preprocessing.lung_box); UCSD figures,
    # already cut to the chest and without HU, stay whole. Recorded in the checkpoint's
    # preprocessing. Trained with architecture cnn8 (real-CT training slices are cut);
    # an mtl network with the image_cnn8 classifier keeps it frozen (train.freeze), as
    # when the lesion decoder of a release is fine-tuned.
    classifier_input: Literal["slice", "lung_box"] = "slice"

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        return list(canonical_tasks(v))

    @model_validator(mode="after")
    def _arch_tasks(self) -> ModelConfig:
        if self.architecture == "unet" and self.tasks != ["segmentation"]:
            raise ValueError("architecture 'unet' has tasks = ['segmentation'] only")
        if self.architecture == "cnn8" and self.tasks != ["classification"]:
            raise ValueError("architecture 'cnn8' has tasks = ['classification'] only")
        if self.classifier_pooling != PAPER_POOLING and (
            self.architecture != "mtl" or "classification" not in self.tasks
        ):
            raise ValueError(
                "classifier_pooling applies to architecture 'mtl' with the classification task"
            )
        if self.classifier_width is not None and self.classifier_pooling != "image_cnn8":
            raise ValueError("classifier_width applies to classifier_pooling 'image_cnn8' only")
        if self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {self.input_size}")
        return self


class DatasetSpec(_Strict):
    """One data set in one of the supported folder formats, and which part of it to use."""

    kind: DatasetKind
    path: str
    split: Split = "train"
    # MedSeg fixed split: sorted by file name (or slice index for NIfTI), every
    # ``val_every``-th slice starting at ``val_offset`` is validation, the rest training.
    val_every: int = Field(5, ge=2)
    val_offset: int = Field(0, ge=0)
    # How many times each sample appears per epoch (oversampling a small set).
    repeat: int = Field(1, ge=1)
    # False: drop this set's class labels from training (its slices then train only
    # segmentation and reconstruction). MedSeg slices are all COVID-positive real CT; with
    # UCSD figures alone on the other side, labelling MedSeg lets the classifier learn "real
    # CT look = COVID". Keep the labels only beside real non-COVID CT (png_stack LUNA16
    # patients, covid_label = false), as config/train/cnn8_realct_cpu.toml does.
    use_class_label: bool = True
    # dicom_seg and png_stack: class label for every slice (None = no classification label).
    covid_label: bool | None = None
    # dicom_seg and png_stack: the case subfolders (patients) to use, by name; given, they
    # replace ``split`` (split by patient, never by slice: a patient's neighbouring slices
    # are near copies of each other).
    cases: list[str] = Field(default_factory=list)
    # train.sampling = "balanced": this set's share of every batch (relative to the other
    # sets' weights); None = its share of the epoch (slices x repeat).
    weight: float | None = Field(None, gt=0)
    # dicom_seg only: segment labels to use as lesion (empty = every segment except lung).
    segment_labels: list[str] = Field(default_factory=list)
    # png_stack with covid_label = false: with augment.lesion_transplant > 0 its slices may
    # receive a lesion cut from a masked slice of the same batch and count as COVID-19
    # (training.augment.transplant_lesions).
    lesion_recipient: bool = False

    @model_validator(mode="after")
    def _kind_fields(self) -> DatasetSpec:
        if self.cases and self.kind not in ("dicom_seg", "png_stack"):
            raise ValueError(f"cases applies to kinds dicom_seg and png_stack, not {self.kind}")
        if len(set(self.cases)) != len(self.cases):
            raise ValueError(f"cases names a case twice: {self.cases}")
        if self.kind == "png_stack" and self.covid_label is None:
            raise ValueError("png_stack needs covid_label (true or false): stacks carry no mask")
        if self.lesion_recipient and (self.kind != "png_stack" or self.covid_label is not False):
            raise ValueError(
                "lesion_recipient applies to png_stack sets with covid_label = false "
                "(real non-COVID CT that a transplanted lesion makes a COVID-19 sample)"
            )
        return self

    def resolve(self, data_root: Path) -> Path:
        p = Path(os.path.expanduser(self.path))
        return p if p.is_absolute() else data_root / p


class DataConfig(_Strict):
    train: list[DatasetSpec]
    val: list[DatasetSpec] = Field(default_factory=list)


class LossConfig(_Strict):
    """Task weights of the global loss (paper: 1, 1, 1) and the Dice smoothing term."""

    reconstruction: float = Field(1.0, ge=0)
    segmentation: float = Field(1.0, ge=0)
    classification: float = Field(1.0, ge=0)
    dice_smooth: float = Field(1.0, gt=0)


class AugmentConfig(_Strict):
    """Batched on-device augmentation; window jitter lets PNG-trained weights meet HU input."""

    enabled: bool = True
    hflip: float = Field(0.5, ge=0, le=1)
    rotate_deg: float = Field(10.0, ge=0, le=180)
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = Field(0.06, ge=0, le=0.5)
    window_jitter: float = Field(0.08, ge=0, le=0.5)
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = Field(0.01, ge=0, le=0.5)
    blur_prob: float = Field(0.2, ge=0, le=1)
    # Sharpness, for scanner differences (reconstruction kernel, slice thickness): with
    # blur_sigma's upper end > 0 the blurred slices get a Gaussian of a random sigma in
    # that range (pixels of the network grid) instead of the fixed 3x3 kernel; sharpen_prob
    # of the slices get an unsharp mask of a random amount in sharpen_amount.
    blur_sigma: tuple[float, float] = (0.0, 0.0)
    sharpen_prob: float = Field(0.0, ge=0, le=1)
    sharpen_amount: tuple[float, float] = (0.3, 1.0)
    # Lesion transplant (issue 12): this share of the recipient slices in a batch (data sets
    # with lesion_recipient) get the lesion of a masked slice of the same batch, at a
    # strength drawn from lesion_strength (1 = the donor's own density), and count as
    # COVID-19. Real non-COVID CT then stands on both sides of the classifier, so the
    # scanner's look cannot tell the classes apart, and faint lesions stand for milder
    # disease than MedSeg's.
    lesion_transplant: float = Field(0.0, ge=0, le=1)
    lesion_strength: tuple[float, float] = (0.4, 1.0)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        for name in ("scale", "gamma", "blur_sigma", "sharpen_amount", "lesion_strength"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high")
        if self.blur_sigma[1] > 8:
            raise ValueError("blur_sigma above 8 pixels blurs a 256 grid into nothing")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(500, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    patience: int = Field(35, ge=1)
    # Stop after this many minutes of training (0 = no limit); counts across resumes.
    max_minutes: float = Field(0.0, ge=0)
    # Cap on optimiser steps per epoch (0 = one pass over the training set).
    max_steps_per_epoch: int = Field(0, ge=0)
    # "shuffle": one shuffled pass over the training sets (each repeated ``repeat`` times);
    # "balanced": every batch holds each training set in proportion to its ``weight``, so
    # no source dominates a batch (real CT of one class must not come in runs).
    sampling: Literal["shuffle", "balanced"] = "shuffle"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    grad_clip: float = Field(0.0, ge=0)
    val_every: int = Field(1, ge=1)
    # Epochs between resumable states (last.pt: weights + Adam moments, ~0.6 GB at width 64);
    # the last epoch of a run is always saved. On a fast GPU an epoch takes about a second.
    checkpoint_every: int = Field(1, ge=1)
    val_batch_size: int = Field(32, ge=1)
    num_workers: int = Field(0, ge=0)
    # Intra-op CPU threads (0 = torch's default, one per core). On a shared, oversubscribed
    # CPU one thread per process is steadier than OpenMP spinning on busy cores; on a GPU
    # the host only collates and draws augmentation parameters.
    cpu_threads: int = Field(0, ge=0)
    # Start from the weights of an mtl_model checkpoint (fine-tuning, e.g. on corrected
    # DICOM SEG series); heads it lacks (a release has no reconstruction) start fresh.
    init_from: str | None = None
    # Top-level modules of the network that keep their weights and BatchNorm statistics
    # (mtl: encoder, reconstruction, segmentation, classification). Freezing the encoder and
    # the classifier fine-tunes the lesion decoder alone and leaves the COVID probability
    # of every image exactly as it was; frozen parts also cost no backward pass.
    freeze: list[str] = Field(default_factory=list)
    # Every BatchNorm layer normalises with, and keeps, the running statistics it starts
    # with (their scale and shift still train). For fine-tuning with small batches (a CPU,
    # one corrected series): batch-of-8 statistics of mixed sources are noisy, and the
    # running averages then drift away from what the frozen or barely moved layers expect.
    freeze_batchnorm: bool = False
    # Stochastic weight averaging (Izmailov et al. 2018): from this epoch on, the weights at
    # the end of every epoch enter a running mean, written as ``swa.safetensors`` when the
    # run ends, with BatchNorm statistics recomputed on one epoch of training batches
    # (0 = off). A fixed rule instead of a pick: validation scores the average, chooses
    # nothing, so its figure is not inflated by the choice as best.safetensors' is.
    swa_start: int = Field(0, ge=0)
    tensorboard: bool = False

    @model_validator(mode="after")
    def _swa_within_run(self) -> TrainConfig:
        if self.swa_start > self.epochs:
            raise ValueError(
                f"swa_start {self.swa_start} is after the last epoch ({self.epochs}): "
                "nothing would be averaged"
            )
        return self

    @field_validator("freeze")
    @classmethod
    def _unique_freeze(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"freeze names a module twice: {v}")
        return v


class ExperimentConfig(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _lung_box_classifier(self) -> ExperimentConfig:
        m = self.model
        if m.classifier_input != "lung_box" or m.architecture == "cnn8":
            return self
        if m.classifier_pooling == "image_cnn8" and "classification" in self.train.freeze:
            return self
        raise ValueError(
            "classifier_input 'lung_box' trains architecture 'cnn8' (its input is the "
            "classifier's own; join it to a lesion network with ctmtl-train compose), or "
            "stays frozen in an mtl network with classifier_pooling 'image_cnn8' "
            '(train.freeze = ["classification", ...])'
        )

    @property
    def cuts_real_ct(self) -> bool:
        """Whether real-CT training and validation slices are cut to their lung box."""
        return self.model.classifier_input == "lung_box" and self.model.architecture == "cnn8"


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a config mapping; errors name the source and every bad field."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        ]
        raise ConfigError(f"invalid training config {source}:\n" + "\n".join(lines)) from exc


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a TOML experiment file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"training config {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"training config {path} is not valid TOML: {exc}") from exc
    return parse_config(raw, str(path))


def dump_toml(cfg: ExperimentConfig) -> str:
    """Serialise a config back to TOML (runs keep the exact config they used)."""
    return _to_toml(cfg.model_dump(mode="json"))


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _to_toml(d: dict[str, Any], prefix: str = "") -> str:
    out: list[str] = []
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_table_list(v)}
    for k, v in scalars.items():
        if v is None:
            continue
        out.append(f"{k} = {_fmt(v)}")
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.append(f"\n[{name}]")
            out.append(_to_toml(v, prefix=f"{name}.").strip("\n"))
        elif _is_table_list(v):
            for item in v:
                out.append(f"\n[[{name}]]")
                out.append(_to_toml(item, prefix=f"{name}.").strip("\n"))
    return "\n".join(x for x in out if x) + "\n"


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
