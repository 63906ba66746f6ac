"""The multi-task training loop: seeded, resumable, early-stopped, single- or multi-process.

One process per device; under ``torchrun`` (env ``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel (NCCL on GPUs, gloo on CPU) and each rank sees its shard of every
epoch (``DistributedSampler``). Validation runs on rank 0 and its score is broadcast, so all
ranks stop together.

Determinism and resume: every epoch reseeds the global RNG (dropout) and the augmentation
generator from ``(seed, epoch, rank)`` and the sampler shuffles by ``(seed, epoch)``, so a run
resumed from ``last.pt`` at an epoch boundary repeats exactly what an uninterrupted run does
(on the CPU bit for bit; GPUs add their own non-determinism). ``last.pt`` holds model,
optimiser, scheduler position, early-stopping state and elapsed time; ``best.safetensors``
is the best validation epoch as an ``mtl_model`` checkpoint (all heads, float32).

Run folder: ``config.toml`` (the exact config), ``data.json`` (slice lists and counts),
``metrics.csv`` (one row per epoch), ``last.pt``, ``best.safetensors``, ``summary.json``,
and with ``train.swa_start`` ``swa.safetensors`` (the mean of the epochs' weights; its
running sum travels in ``last.pt``, so a resumed run averages what an uninterrupted one does).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from mtl_model import (
    CheckpointError,
    CheckpointMetadata,
    build_model,
    load_checkpoint,
    native_bf16,
    save_checkpoint,
)
from mtl_model.checkpoint import ArchitectureSpec, PreprocessingSpec
from mtl_model.metrics import classification_metrics, roc_auc, segmentation_metrics
from training.augment import augment_batch, transplant_lesions
from training.config import (
    REPO_ROOT,
    ExperimentConfig,
    ModelConfig,
    default_data_root,
    dump_toml,
)
from training.data import SliceDataset, SliceSet, concat_slice_sets, load_spec
from training.export import cnn8_state
from training.losses import MultiTaskLoss

logger = logging.getLogger(__name__)

CSV_FIELDS = [
    "epoch",
    "step",
    "elapsed_s",
    "epoch_s",
    "lr",
    "train_loss",
    "train_mse",
    "train_dice",
    "train_bce",
    "slices_per_s",
    "val_auc",
    "val_accuracy",
    "val_sensitivity",
    "val_specificity",
    "val_dice",
    "val_dice_pooled",
    "val_real_auc",
    "val_score",
    "best_score",
    "best_epoch",
]


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad resume state, bad device, ...)."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class FitResult:
    out_dir: Path
    best_epoch: int
    best_score: float
    best_metrics: dict[str, float]
    epochs_run: int
    stopped: str
    elapsed_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainData:
    train: SliceSet
    repeats: list[int]
    parts: list[SliceSet]
    val: list[SliceSet]

    def summary(self) -> dict[str, Any]:
        return {
            "train": [
                {**p.summary(), "repeat": r} for p, r in zip(self.parts, self.repeats, strict=True)
            ],
            "val": [v.summary() for v in self.val],
        }


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if there is one (env WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where it is native (recent GPUs, CPUs with AMX/AVX512-BF16), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_data(cfg: ExperimentConfig, data_root: Path) -> TrainData:
    """Load every configured data set onto the network grid."""
    size = cfg.model.input_size
    box = cfg.cuts_real_ct
    parts = [load_spec(s, data_root, size, box) for s in cfg.data.train]
    repeats = [s.repeat for s in cfg.data.train]
    return TrainData(
        train=concat_slice_sets(parts),
        repeats=repeats,
        parts=parts,
        val=[load_spec(s, data_root, size, box) for s in cfg.data.val],
    )


class _RepeatedSlices(SliceDataset):
    """Concatenation of slice sets, each repeated its configured number of times."""

    def __init__(self, slices: SliceSet, parts: list[SliceSet], repeats: list[int]) -> None:
        super().__init__(slices)
        index: list[int] = []
        start = 0
        for p, r in zip(parts, repeats, strict=True):
            index += list(range(start, start + len(p))) * r
            start += len(p)
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return super().__getitem__(self.index[i])


def batch_shares(weights: Sequence[float], batch_size: int) -> list[int]:
    """How many of a batch each source gets: proportional to ``weights``, largest remainder."""
    total = float(sum(weights))
    exact = [batch_size * w / total for w in weights]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[
        : batch_size - sum(counts)
    ]:
        counts[i] += 1
    return counts


class BalancedBatchSampler(Sampler[int]):
    """Indices whose every consecutive ``batch_size`` block holds each source in proportion.

    Each source is drawn without replacement in a fresh permutation of its slices, and
    again once it is used up, so small sets are cycled (oversampled) and large ones are
    spread over the epochs. Draws depend only on ``(seed, epoch)``; under DDP every rank
    takes its own batches from the same sequence, like ``DistributedSampler``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        batch_size: int,
        steps_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(sizes) != len(weights) or not sizes or min(sizes) < 1:
            raise ValueError("every source needs a size >= 1 and a weight")
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = list(sizes)
        self.counts = batch_shares(weights, batch_size)
        if 0 in self.counts:
            raise ValueError(
                f"batches of {batch_size} leave a source out (shares {self.counts}); "
                "raise its weight or the batch size"
            )
        self.batch_size = batch_size
        self.steps = steps_per_epoch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        need = [c * self.steps * self.world_size for c in self.counts]
        streams = []
        for size, offset, k in zip(self.sizes, self.offsets, need, strict=True):
            rounds = max(1, math.ceil(k / size))
            perm = torch.cat([torch.randperm(size, generator=g) for _ in range(rounds)])
            streams.append((perm[:k] + offset).view(self.steps * self.world_size, -1))
        for step in range(self.steps):
            row = step * self.world_size + self.rank
            yield from torch.cat([s[row] for s in streams]).tolist()


def build_metadata(
    cfg: ExperimentConfig, training: dict[str, Any], metrics: dict[str, Any], version: str
) -> CheckpointMetadata:
    """Checkpoint metadata describing a network trained from ``cfg``."""
    m = cfg.model
    return CheckpointMetadata(
        architecture=ArchitectureSpec(
            name=m.architecture,
            base_width=m.base_width,
            input_size=m.input_size,
            in_channels=1,
            tasks=list(m.tasks),
            classifier_pooling=m.classifier_pooling,
            classifier_width=m.classifier_width,
        ),
        preprocessing=PreprocessingSpec(
            input_size=m.input_size, classifier_input=m.classifier_input
        ),
        model_version=version,
        training=training,
        metrics=metrics,
    )


@torch.no_grad()
def predict_slices(
    model: nn.Module,
    slices: SliceSet,
    device: torch.device,
    precision: str,
    batch_size: int = 32,
    channels_last: bool = True,
) -> dict[str, np.ndarray]:
    """Sigmoid outputs on the network grid: 'segmentation' (N, S, S), 'classification' (N,)."""
    was_training = model.training
    model.eval()
    seg: list[np.ndarray] = []
    cls: list[np.ndarray] = []
    try:
        for start in range(0, len(slices), batch_size):
            x = slices.images[start : start + batch_size].to(device).float().div_(255.0)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, precision):
                out = model(x)
            if "segmentation" in out:
                seg.append(torch.sigmoid(out["segmentation"].float())[:, 0].cpu().numpy())
            if "classification" in out:
                cls.append(torch.sigmoid(out["classification"].float()).cpu().numpy())
    finally:
        model.train(was_training)
    res: dict[str, np.ndarray] = {}
    if seg:
        res["segmentation"] = np.concatenate(seg)
    if cls:
        res["classification"] = np.concatenate(cls)
    return res


def validate(
    model: nn.Module,
    val: list[SliceSet],
    device: torch.device,
    precision: str,
    batch_size: int = 32,
    channels_last: bool = True,
) -> dict[str, float]:
    """Validation metrics on the network grid.

    Classification is scored on the UCSD-style sets (``auc`` and the rates: labelled
    slices without a mask, as the evaluate contract does) and, separately, on the
    labelled slices of real-CT sets (MedSeg, PNG stacks, DICOM: ``real_auc``), so that
    neither hides the other; segmentation on every slice with a mask. ``score`` (the
    early-stopping criterion) is the mean of AUC, real-CT AUC and Dice, whichever exist.
    """
    labels: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    real_labels: list[np.ndarray] = []
    real_probs: list[np.ndarray] = []
    lesion: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    for s in val:
        pred = predict_slices(model, s, device, precision, batch_size, channels_last)
        if "classification" in pred:
            if s.source.startswith("covid_ct"):
                sel = (s.has_label & ~s.has_mask).numpy()
                labels.append(s.labels.numpy()[sel])
                probs.append(pred["classification"][sel])
            else:
                sel = s.has_label.numpy()
                real_labels.append(s.labels.numpy()[sel])
                real_probs.append(pred["classification"][sel])
        seg_sel = s.has_mask.numpy()
        if "segmentation" in pred and seg_sel.any():
            lesion.append(pred["segmentation"][seg_sel])
            truth.append(s.masks[:, 0].numpy()[seg_sel] > 0)
    out: dict[str, float] = {}
    parts: list[float] = []
    if probs and sum(len(p) for p in probs):
        c = classification_metrics(np.concatenate(labels), np.concatenate(probs))
        out.update({k: float(v) for k, v in c.items() if k != "n"})
        if math.isfinite(out["auc"]):
            parts.append(out["auc"])
    if real_probs and sum(len(p) for p in real_probs):
        y, p = np.concatenate(real_labels), np.concatenate(real_probs)
        pos, neg = y > 0.5, y <= 0.5
        if pos.any():
            out["real_mean_covid"] = float(p[pos].mean())
        if neg.any():
            out["real_mean_non_covid"] = float(p[neg].mean())
        if pos.any() and neg.any():
            out["real_auc"] = float(roc_auc(y, p))
            parts.append(out["real_auc"])
    if lesion:
        sm = segmentation_metrics(np.concatenate(lesion), np.concatenate(truth))
        out["dice"] = float(sm["dice"])
        out["dice_pooled"] = float(sm["dice_pooled"])
        parts.append(out["dice"])
    out["score"] = float(np.mean(parts)) if parts else float("nan")
    return out


def _lr_factor(cfg: ExperimentConfig, step: int, total_steps: int, elapsed: float) -> float:
    t = cfg.train
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    if t.lr_schedule == "constant":
        return warm
    if t.max_minutes > 0:
        frac = min(1.0, elapsed / (t.max_minutes * 60.0))
    else:
        frac = min(1.0, step / max(1, total_steps))
    return warm * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _saved_model(saved: dict[str, Any]) -> Any:
    """A run's stored model section with today's defaults filled in (older runs lack fields)."""
    try:
        return ModelConfig.model_validate(saved.get("model")).model_dump(mode="json")
    except ValueError:
        return saved.get("model")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 9_973 + rank * 101) % (2**63 - 1)


def _batches(loader: DataLoader[Any], limit: int) -> Iterator[dict[str, torch.Tensor]]:
    for i, b in enumerate(loader):
        if limit and i >= limit:
            return
        yield b


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _init_from_checkpoint(model: nn.Module, path: Path) -> None:
    """Copy matching weights from a checkpoint; heads it lacks keep their fresh init."""
    src, meta = load_checkpoint(path, device="cpu")
    own = model.state_dict()
    theirs = src.state_dict()
    if meta.architecture.name == "mtl" and not any(k in own for k in theirs):
        with contextlib.suppress(CheckpointError):
            # a release whose T3 is one 8-layer CNN fine-tunes as that CNN
            theirs = cnn8_state(path, src, meta.architecture)
    bad = [k for k, v in theirs.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise TrainingError(
            f"init_from {path}: {len(bad)} tensors differ in shape from this network "
            f"(e.g. {bad[:3]}); widths or input sizes differ"
        )
    common = {k: v for k, v in theirs.items() if k in own}
    if not common:
        raise TrainingError(f"init_from {path}: no weights in common with this network")
    model.load_state_dict(common, strict=False)
    fresh = sorted({k.split(".")[0] for k in own if k not in common})
    logger.info(
        "initialised from %s (%s): %d tensors copied, fresh: %s",
        path,
        meta.model_version,
        len(common),
        fresh or "none",
    )


def _freeze(model: nn.Module, names: Sequence[str], batchnorm: bool) -> list[nn.Module]:
    """Stop gradients in the named top-level modules; returns what the loop keeps in eval mode.

    That is the frozen modules and, with ``batchnorm``, every BatchNorm layer: in eval mode
    BatchNorm normalises with its running statistics and leaves them unchanged.
    """
    children = dict(model.named_children())
    missing = [n for n in names if n not in children]
    if missing:
        raise TrainingError(
            f"train.freeze names {missing}, which this network does not have "
            f"(its modules: {sorted(children)})"
        )
    frozen = [children[n] for n in names]
    for mod in frozen:
        mod.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise TrainingError(f"train.freeze {list(names)} leaves nothing to train")
    if names:
        logger.info(
            "frozen: %s; %d of %d parameters train",
            ", ".join(names),
            trainable,
            sum(p.numel() for p in model.parameters()),
        )
    if batchnorm:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        logger.info("BatchNorm statistics frozen in %d layers", len(norms))
        frozen += norms
    return frozen


def _train_inputs(
    batch: dict[str, torch.Tensor], cfg: ExperimentConfig, gen: torch.Generator, dev: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A loader batch on ``dev``, augmented; and the network's input in its memory format."""
    batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    batch = transplant_lesions(batch, cfg.augment, gen)
    x, mask = augment_batch(batch["image"], batch["mask"], cfg.augment, gen)
    batch["image"], batch["mask"] = x, mask
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return batch, x


def _swa_add(
    avg: dict[str, torch.Tensor] | None, model: nn.Module, count: int
) -> dict[str, torch.Tensor]:
    """``avg``, the mean of ``count`` epochs' float tensors, with ``model``'s added (fp32)."""
    now = {
        k: v.detach().to("cpu", torch.float32, copy=True)
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }
    if avg is None:
        return now
    for k, v in now.items():
        avg[k] += (v - avg[k]) / (count + 1)
    return avg


@torch.no_grad()
def _swa_model(
    model: nn.Module,
    avg: dict[str, torch.Tensor],
    batches: Iterator[torch.Tensor],
    keep: Sequence[nn.Module],
    dev: torch.device,
    precision: str,
) -> nn.Module:
    """A copy of ``model`` with the averaged weights and, for every BatchNorm layer outside
    ``keep`` (frozen modules and layers), running statistics measured afresh on ``batches``:
    the averaged weights' activations differ from any epoch's, so the epochs' averaged
    statistics would not fit them (Izmailov et al. 2018, torch.optim.swa_utils.update_bn)."""
    swa = copy.deepcopy(model)
    state = swa.state_dict()
    swa.load_state_dict({k: avg[k].to(state[k].dtype) if k in avg else v for k, v in state.items()})
    kept = {id(m) for mod in keep for m in mod.modules()}  # ``model``'s modules, not the copy's
    norms = [
        m
        for original, m in zip(model.modules(), swa.modules(), strict=True)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(original) not in kept
    ]
    if not norms:
        return swa.eval()
    swa.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain mean over the batches
        m.train()
    n = 0
    for x in batches:
        with _autocast(dev, precision):
            swa(x)
        n += 1
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    logger.info("SWA: BatchNorm statistics of %d layers from %d batches", len(norms), n)
    return swa.eval()


def fit(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    *,
    resume: bool = True,
    device: str = "auto",
    progress: bool = True,
    max_epochs: int | None = None,
) -> FitResult:
    """Train ``cfg`` into ``out_dir``; continues from ``out_dir/last.pt`` when ``resume``.

    ``max_epochs`` stops after that many epochs in total (the run stays resumable), which
    is how tests and interrupted jobs split one run into parts.
    """
    out = Path(out_dir)
    root = Path(data_root) if data_root is not None else default_data_root()
    if device == "auto":
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_type = torch.device(device).type
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda requested but no CUDA device is available")
    di = init_distributed(dev_type)
    dev = torch.device(f"cuda:{di.local_rank}") if dev_type == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick kernels
    precision = resolve_precision(cfg.train.precision, dev)
    t = cfg.train
    if t.cpu_threads:
        # also on a GPU: the per-step host work (collation, augmentation draws) is small,
        # and several runs sharing one machine each with one thread per core oversubscribe
        # it (measured: 3 runs x 16 threads on 16 cores made H100 steps 35x slower)
        torch.set_num_threads(t.cpu_threads)
    out.mkdir(parents=True, exist_ok=True)

    state: dict[str, Any] | None = None
    last_path = out / "last.pt"
    if resume and last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        saved = state.get("config", {})
        # what the saved weights and Adam state depend on must not change under them
        for what, was, now in (
            ("model", _saved_model(saved), cfg.model.model_dump(mode="json")),
            ("train.freeze", saved.get("train", {}).get("freeze", []), t.freeze),
        ):
            if was != now:
                raise TrainingError(
                    f"{last_path} was trained with {what} {was}, the config now says {now}; "
                    "use a new --out folder or --no-resume"
                )
        if saved != cfg.model_dump(mode="json"):
            logger.warning("resuming %s with a config that differs from the saved one", out)
        if state.get("finished"):
            logger.info("run %s already finished (%s)", out, state.get("stopped"))
    elif not resume and last_path.exists() and di.main:
        logger.warning("--no-resume: starting %s afresh (old last.pt is overwritten)", out)

    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = build_model(
        m.architecture,
        m.base_width,
        m.input_size,
        1,
        m.tasks,
        m.classifier_pooling,
        m.classifier_width,
    ).to(dev)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if state is None and t.init_from:
        init = Path(os.path.expanduser(t.init_from))
        if not init.is_absolute() and not init.exists():
            init = REPO_ROOT / init  # config files name repository paths
        _init_from_checkpoint(model, init)
    frozen = _freeze(model, t.freeze, t.freeze_batchnorm)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay
    )
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    data = load_data(cfg, root)
    dataset = _RepeatedSlices(data.train, data.parts, data.repeats)
    if len(dataset) < t.batch_size * di.world_size:
        raise TrainingError(
            f"{len(dataset)} training samples are fewer than one batch per process "
            f"({t.batch_size} x {di.world_size})"
        )
    sampler: DistributedSampler[dict[str, torch.Tensor]] | BalancedBatchSampler
    if t.sampling == "balanced":
        steps = len(dataset) // (t.batch_size * di.world_size)
        if t.max_steps_per_epoch:
            steps = min(steps, t.max_steps_per_epoch)
        sampler = BalancedBatchSampler(
            [len(p) for p in data.parts],
            [
                spec.weight if spec.weight is not None else len(part) * spec.repeat
                for spec, part in zip(cfg.data.train, data.parts, strict=True)
            ],
            t.batch_size,
            steps,
            seed=cfg.seed,
            rank=di.rank,
            world_size=di.world_size,
        )
        if di.main:
            logger.info(
                "balanced batches of %d: %s",
                t.batch_size,
                ", ".join(
                    f"{p.source} {c}" for p, c in zip(data.parts, sampler.counts, strict=True)
                ),
            )
    else:
        sampler = DistributedSampler(
            dataset,
            num_replicas=di.world_size,
            rank=di.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
        )
    # the balanced sampler yields indices into the concatenated sets, not their repeats
    loader = DataLoader(
        SliceDataset(data.train) if t.sampling == "balanced" else dataset,
        batch_size=t.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=t.num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=t.num_workers > 0,
    )
    steps_per_epoch = (
        len(loader) if not t.max_steps_per_epoch else min(len(loader), t.max_steps_per_epoch)
    )
    total_steps = steps_per_epoch * t.epochs

    start_epoch = 1
    global_step = 0
    elapsed = 0.0
    best_score = -math.inf
    best_epoch = 0
    best_metrics: dict[str, float] = {}
    bad = 0
    history: list[dict[str, Any]] = []
    finished = False
    stopped = ""
    swa_avg: dict[str, torch.Tensor] | None = None
    swa_count = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        global_step = int(state["global_step"])
        elapsed = float(state["elapsed_s"])
        best_score = float(state["best_score"])
        best_epoch = int(state["best_epoch"])
        best_metrics = dict(state.get("best_metrics", {}))
        bad = int(state["bad_epochs"])
        history = list(state.get("history", []))
        finished = bool(state.get("finished", False))
        stopped = str(state.get("stopped", ""))
        swa_avg = state.get("swa")
        swa_count = int(state.get("swa_epochs", 0))
        if di.main:
            logger.info(
                "resumed %s at epoch %d (step %d, best %.4f at epoch %d)",
                out,
                start_epoch,
                global_step,
                best_score,
                best_epoch,
            )
    train_model: nn.Module = model
    if di.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    if t.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    loss_fn = MultiTaskLoss(cfg.loss)

    summary = data.summary()
    if di.main:
        (out / "config.toml").write_text(dump_toml(cfg), encoding="utf-8")
        _write_json(
            out / "data.json",
            {
                "data_root": str(root),
                "summary": summary,
                "train_names": data.train.names,
                "val_names": [v.names for v in data.val],
            },
        )
        logger.info(
            "training %s: %s width %d at %d, tasks %s, %s on %s x%d, %d samples/epoch "
            "(%d steps of %d)",
            cfg.name,
            m.architecture,
            m.base_width,
            m.input_size,
            m.tasks,
            precision,
            dev,
            di.world_size,
            len(dataset),
            steps_per_epoch,
            t.batch_size,
        )
    writer = None
    if t.tensorboard and di.main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            logger.warning("tensorboard requested but not installed; CSV log only")

    def training_info(epoch: int) -> dict[str, Any]:
        """What a checkpoint written now says of its training."""
        return {
            "experiment": cfg.name,
            "config": cfg.model_dump(mode="json"),
            "epoch": epoch,
            "step": global_step,
            "elapsed_s": round(elapsed, 1),
            "precision": precision,
            "machine": _machine(),
            "world_size": di.world_size,
            "data": summary,
            "torch": torch.__version__,
        }

    csv_path = out / "metrics.csv"
    last_epoch = start_epoch - 1
    end_epoch = t.epochs if max_epochs is None else min(t.epochs, max_epochs)
    budget = t.max_minutes * 60.0
    epoch = start_epoch
    while not finished and epoch <= end_epoch:
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, di.rank))
        gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, di.rank) + 1)
        sampler.set_epoch(epoch)
        train_model.train()
        for mod in frozen:
            mod.eval()  # its BatchNorm running statistics stay as they were
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        n_slices = 0
        t0 = time.perf_counter()
        lr = t.lr
        bar = tqdm(
            _batches(loader, steps_per_epoch),
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{t.epochs}",
            disable=not (progress and di.main),
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            leave=False,
        )
        out_of_time = False
        for raw in bar:
            batch, x = _train_inputs(raw, cfg, gen, dev)
            lr = t.lr * _lr_factor(
                cfg, global_step, total_steps, elapsed + time.perf_counter() - t0
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(dev, precision):
                outputs = train_model(x)
            loss, parts = loss_fn(outputs, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if not math.isfinite(parts["loss"]):
                raise TrainingError(f"loss became {parts['loss']} at step {global_step}")
            global_step += 1
            n_slices += x.shape[0]
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{lr:.1e}", refresh=False)
            if budget and elapsed + time.perf_counter() - t0 >= budget:
                out_of_time = True
                break
        bar.close()
        epoch_s = time.perf_counter() - t0
        elapsed += epoch_s
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": global_step,
            "elapsed_s": round(elapsed, 1),
            "epoch_s": round(epoch_s, 1),
            "lr": lr,
            "slices_per_s": round(n_slices * di.world_size / max(epoch_s, 1e-9), 2),
        }
        for k in ("loss", "mse", "dice", "bce"):
            if counts.get(k):
                row[f"train_{k}"] = round(sums[k] / counts[k], 5)
        do_val = bool(data.val) and (epoch % t.val_every == 0 or epoch == end_epoch or out_of_time)
        score_t = torch.tensor([float("nan")], dtype=torch.float64)
        metrics: dict[str, float] = {}
        if do_val and di.main:
            metrics = validate(model, data.val, dev, precision, t.val_batch_size, t.channels_last)
            score_t[0] = metrics["score"]
            for k, v in metrics.items():
                row[f"val_{k}"] = round(v, 5)
        if di.enabled:
            st = score_t.to(dev) if dev.type == "cuda" else score_t
            dist.broadcast(st, src=0)
            score_t = st.cpu()
        score = float(score_t[0])
        if do_val:
            if math.isfinite(score) and score > best_score + 1e-6:
                best_score, best_epoch, bad = score, epoch, 0
                best_metrics = metrics
                if di.main:
                    meta = build_metadata(
                        cfg,
                        training_info(epoch),
                        {"validation_network_grid": metrics},
                        f"0.0.0+{cfg.name}.e{epoch}",
                    )
                    save_checkpoint(model, meta, out / "best.safetensors")
            else:
                bad += 1
        row["best_score"] = round(best_score, 5) if math.isfinite(best_score) else ""
        row["best_epoch"] = best_epoch
        history.append(row)
        if di.main:
            new = not csv_path.exists()
            with csv_path.open("a", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)
            if writer is not None:
                for k, v in row.items():
                    if isinstance(v, int | float) and k != "epoch":
                        writer.add_scalar(k, v, epoch)
            logger.info(
                "epoch %d: loss %s, val %s, %.1f slices/s, %.0f s",
                epoch,
                row.get("train_loss"),
                {k: round(v, 4) for k, v in metrics.items()},
                row["slices_per_s"],
                epoch_s,
            )
        if t.swa_start and epoch >= t.swa_start:
            swa_avg = _swa_add(swa_avg, model, swa_count)
            swa_count += 1
        if bad >= t.patience:
            finished, stopped = True, f"early stop: no improvement for {bad} validations"
        elif out_of_time:
            finished, stopped = True, f"time budget of {t.max_minutes} min reached"
        elif epoch >= t.epochs:
            finished, stopped = True, f"all {t.epochs} epochs done"
        if di.main and (finished or epoch == end_epoch or epoch % t.checkpoint_every == 0):
            _atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "global_step": global_step,
                    "elapsed_s": elapsed,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "best_metrics": best_metrics,
                    "bad_epochs": bad,
                    "history": history,
                    "finished": finished,
                    "stopped": stopped,
                    "config": cfg.model_dump(mode="json"),
                    "swa": swa_avg,
                    "swa_epochs": swa_count,
                },
                last_path,
            )
        last_epoch = epoch
        epoch += 1
    if writer is not None:
        writer.close()
    if not stopped:
        stopped = f"paused after epoch {last_epoch} (resumable)"
    swa_summary: dict[str, Any] = {}
    if di.main and swa_avg is not None and last_epoch >= start_epoch:

        def bn_batches() -> Iterator[torch.Tensor]:
            # one epoch of training batches, augmented as in training, in a fixed order
            sampler.set_epoch(0)
            gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, 0, di.rank) + 1)
            for raw in _batches(loader, steps_per_epoch):
                yield _train_inputs(raw, cfg, gen, dev)[1]

        swa = _swa_model(model, swa_avg, bn_batches(), frozen, dev, precision)
        swa_metrics = (
            validate(swa, data.val, dev, precision, t.val_batch_size, t.channels_last)
            if data.val
            else {}
        )
        swa_summary = {
            "first_epoch": t.swa_start,
            "last_epoch": last_epoch,
            "epochs": swa_count,
            "metrics_network_grid": swa_metrics,
        }
        meta = build_metadata(
            cfg,
            training_info(last_epoch)
            | {"swa": {k: v for k, v in swa_summary.items() if k != "metrics_network_grid"}},
            {"validation_network_grid": swa_metrics},
            f"0.0.0+{cfg.name}.swa{t.swa_start}-{last_epoch}",
        )
        save_checkpoint(swa, meta, out / "swa.safetensors")
        logger.info(
            "SWA of epochs %d-%d (%d): val %s (scored, not used to choose)",
            t.swa_start,
            last_epoch,
            swa_count,
            {k: round(v, 4) for k, v in swa_metrics.items()},
        )
    if di.main:
        _write_json(
            out / "summary.json",
            {
                "experiment": cfg.name,
                "best_epoch": best_epoch,
                "best_score": best_score if math.isfinite(best_score) else None,
                "best_metrics_network_grid": best_metrics,
                "swa": swa_summary or None,
                "epochs_run": last_epoch,
                "steps": global_step,
                "stopped": stopped,
                "elapsed_s": round(elapsed, 1),
                "precision": precision,
                "machine": _machine(),
                "world_size": di.world_size,
                "data": summary,
            },
        )
        logger.info(
            "%s: %s; best score %.4f at epoch %d", cfg.name, stopped, best_score, best_epoch
        )
    if di.enabled:
        dist.barrier()
    return FitResult(
        out, best_epoch, best_score, best_metrics, last_epoch, stopped, elapsed, history
    )
