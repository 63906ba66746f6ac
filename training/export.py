"""``ctmtl-train export``: a run's best weights -> the self-describing release checkpoint.

Keeps the inference heads only (encoder, segmentation, classification; the reconstruction
decoder is a training-time helper), stores fp16 weights (half the size; the node loads
them as float32), gives the checkpoint a fresh device UID (the IHE AI Results equipment
identity changes with every retrained model) and writes into its metadata the training
configuration, the data summary and the validation metrics measured on exactly the
shipped (fp16-rounded) weights with ``mtl_model.Predictor``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_model import (
    CheckpointError,
    Predictor,
    default_checkpoint_path,
    load_checkpoint,
    new_device_uid,
    save_checkpoint,
)
from mtl_model.checkpoint import ArchitectureSpec, CheckpointMetadata
from training.config import ExperimentConfig, default_data_root, load_config
from training.evaluate import evaluate

logger = logging.getLogger(__name__)

MAX_RELEASE_BYTES = 70 * 1024 * 1024
INFERENCE_TASKS = ("segmentation", "classification")


def _val_paths(
    run_cfg: ExperimentConfig | None, data_root: Path
) -> tuple[Path | None, Path | None]:
    """The UCSD and MedSeg folders a run validated on (defaults: the shared data layout)."""
    covid = data_root / "covid-ct"
    medseg = data_root / "medseg-100"
    if run_cfg is not None:
        for spec in run_cfg.data.val:
            if spec.kind == "covid_ct":
                covid = spec.resolve(data_root)
            elif spec.kind in ("medseg_png", "medseg_nifti"):
                medseg = spec.resolve(data_root)
    return (covid if covid.exists() else None), (medseg if medseg.exists() else None)


def export_release(
    run_dir: str | Path | None = None,
    out: str | Path | None = None,
    checkpoint: str | Path | None = None,
    version: str | None = None,
    data_root: str | Path | None = None,
    evaluate_val: bool = True,
    notes: str | None = None,
    device: str = "auto",
    n_boot: int = 2000,
) -> Path:
    """Write the inference-only fp16 checkpoint; returns its path."""
    if checkpoint is None:
        if run_dir is None:
            raise ValueError("export needs --run or --checkpoint")
        checkpoint = Path(run_dir) / "best.safetensors"
    src = Path(checkpoint)
    out_path = Path(out) if out is not None else default_checkpoint_path()
    model, meta = load_checkpoint(src, device="cpu")
    keep = [t for t in meta.architecture.tasks if t in INFERENCE_TASKS]
    if not keep:
        raise CheckpointError(
            f"checkpoint {src} has no inference head (segmentation or classification)"
        )
    arch = meta.architecture
    inf = arch.build(keep)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("reconstruction.")}
    inf.load_state_dict(state, strict=True)
    with torch.no_grad():
        for t in inf.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())  # evaluate exactly what is shipped
    inf.eval()

    run_cfg = None
    run_summary: dict[str, Any] = {}
    if run_dir is not None:
        rd = Path(run_dir)
        if (rd / "config.toml").is_file():
            run_cfg = load_config(rd / "config.toml")
        if (rd / "summary.json").is_file():
            run_summary = json.loads((rd / "summary.json").read_text(encoding="utf-8"))
    training = dict(meta.training)
    training["source_checkpoint"] = str(src)
    training["source_model_version"] = meta.model_version
    if run_summary:
        training["run"] = {
            k: run_summary.get(k)
            for k in (
                "experiment",
                "best_epoch",
                "epochs_run",
                "steps",
                "stopped",
                "elapsed_s",
                "precision",
                "machine",
            )
        }
    if version is None:
        name = training.get("experiment", "model")
        version = f"0.1.0+{name}.e{training.get('epoch', 0)}"
    new_meta = CheckpointMetadata(
        architecture=arch.model_copy(update={"tasks": keep}),
        preprocessing=meta.preprocessing,
        labels=meta.labels,
        model_name=meta.model_name,
        model_version=version,
        device_uid=new_device_uid(),
        training=training,
        metrics=dict(meta.metrics),
        notes=notes if notes is not None else meta.notes,
    )
    if evaluate_val:
        root = Path(data_root) if data_root is not None else default_data_root()
        covid, medseg = _val_paths(run_cfg, root)
        if covid is None and medseg is None:
            raise FileNotFoundError(f"no validation data under {root}; pass --data or --no-eval")
        report_dir = Path(run_dir) / "export_val_report" if run_dir is not None else None
        predictor = Predictor.from_model(inf, new_meta, device=device)
        res = evaluate(
            covid_ct=covid,
            split="val",
            medseg=medseg,
            medseg_split="val",
            report_dir=report_dir,
            json_out=(report_dir / "val.json") if report_dir is not None else None,
            predictor=predictor,
            n_boot=n_boot,
        )
        metrics = dict(new_meta.metrics)
        metrics["validation"] = {k: res[k] for k in ("classification", "segmentation") if k in res}
        metrics["validation"]["measured_with"] = (
            f"mtl_model.Predictor on {res['device']} ({res['precision']}), fp16 weights, "
            "UCSD official val split, MedSeg fixed val slices (every 5th sorted file)"
        )
        new_meta = new_meta.model_copy(update={"metrics": metrics})
    path = save_checkpoint(inf, new_meta, out_path, dtype=torch.float16, tasks=keep)
    size = path.stat().st_size
    if size > MAX_RELEASE_BYTES:
        raise CheckpointError(
            f"exported checkpoint {path} is {size / 2**20:.1f} MiB, over the 70 MB release limit"
        )
    v = new_meta.metrics.get("validation", {})
    logger.info(
        "exported %s (%.1f MiB, %s, heads %s): AUC %s, Dice %s",
        path,
        size / 2**20,
        version,
        keep,
        _num(v.get("classification", {}).get("auc")),
        _num(v.get("segmentation", {}).get("dice")),
    )
    return path


def cnn8_state(path: str | Path, model: nn.Module, arch: ArchitectureSpec) -> dict[str, Any]:
    """The 8-layer CNN weights of a cnn8 checkpoint, or of an mtl one's single-CNN8 T3."""
    if arch.name == "cnn8":
        return dict(model.state_dict())
    if (
        arch.name == "mtl"
        and arch.classifier_pooling == "image_cnn8"
        and arch.classifier_members == 1
        and not arch.classifier_flip
        and "classification" in arch.tasks
    ):
        return {
            k.removeprefix("classification."): v
            for k, v in model.state_dict().items()
            if k.startswith("classification.")
        }
    raise CheckpointError(f"{path}: holds no single 8-layer CNN classifier")


def compose_checkpoint(
    segmentation_from: str | Path,
    classification_from: str | Path | Sequence[str | Path],
    out: str | Path,
    flip: bool = False,
) -> Path:
    """One mtl checkpoint from several: the encoder and lesion decoder of
    ``segmentation_from`` and, as T3 (``classifier_pooling = "image_cnn8"``), the 8-layer
    CNN of ``classification_from``, or the mean of several such CNNs of one width (and,
    with ``flip``, of each slice's mirror too). Float32, not a release: ``export
    --checkpoint`` makes that.

    This is how classifiers retrained apart join a release whose lesion maps stay bit for
    bit what they were (docs/experiments.md, seventh and tenth sessions).
    """
    members = (
        [classification_from]
        if isinstance(classification_from, str | Path)
        else list(classification_from)
    )
    if not members:
        raise CheckpointError("no classifier checkpoint given")
    seg_model, seg_meta = load_checkpoint(segmentation_from, device="cpu")
    sa = seg_meta.architecture
    if sa.name != "mtl" or "segmentation" not in sa.tasks:
        raise CheckpointError(f"{segmentation_from}: not an mtl checkpoint with a lesion decoder")
    own_input = {"classifier_input", "lung_box_margin"}  # the classifier's, by design
    states: list[dict[str, Any]] = []
    metas: list[CheckpointMetadata] = []
    widths: set[int] = set()
    for path in members:
        cls_model, cls_meta = load_checkpoint(path, device="cpu")
        ca = cls_meta.architecture
        states.append(cnn8_state(path, cls_model, ca))
        widths.add(ca.base_width if ca.name == "cnn8" else ca.classifier_width or ca.base_width)
        if ca.input_size != sa.input_size or ca.in_channels != sa.in_channels:
            raise CheckpointError(
                f"{path}: the classifier takes {ca.input_size}x{ca.input_size} slices, the "
                f"lesion network {sa.input_size}x{sa.input_size}"
            )
        if cls_meta.preprocessing.model_dump(
            exclude=own_input
        ) != seg_meta.preprocessing.model_dump(exclude=own_input):
            raise CheckpointError(f"{path} and the lesion network preprocess differently")
        if metas and cls_meta.preprocessing != metas[0].preprocessing:
            raise CheckpointError(f"{path}: another classifier input than {members[0]}")
        metas.append(cls_meta)
    if len(widths) > 1:
        raise CheckpointError(f"the classifiers have different widths {sorted(widths)}")
    cls_meta = metas[0]
    arch = sa.model_copy(
        update={
            "tasks": ["segmentation", "classification"],
            "classifier_pooling": "image_cnn8",
            "classifier_width": widths.pop(),
            "classifier_members": len(members),
            "classifier_flip": flip,
        }
    )
    model = arch.build()
    state = {
        k: v
        for k, v in seg_model.state_dict().items()
        if k.startswith(("encoder.", "segmentation."))
    }
    single = len(members) == 1 and not flip
    for i, cls_state in enumerate(states):
        prefix = "classification." if single else f"classification.members.{i}."
        state |= {f"{prefix}{k}": v for k, v in cls_state.items()}
    model.load_state_dict(state, strict=True)

    def source(path: str | Path, meta: CheckpointMetadata) -> dict[str, Any]:
        return {
            "checkpoint": str(path),
            "model_version": meta.model_version,
            "device_uid": meta.device_uid,
            "training": meta.training,
            "metrics": meta.metrics,
        }

    cls_sources = [source(p, m) for p, m in zip(members, metas, strict=True)]
    cls_version = (
        "+".join(m.model_version for m in metas)
        if single
        else (f"{len(members)}x{metas[0].model_version}" + ("+flip" if flip else ""))
    )
    meta = CheckpointMetadata(
        architecture=arch,
        preprocessing=seg_meta.preprocessing.model_copy(
            update={k: getattr(cls_meta.preprocessing, k) for k in own_input}
        ),
        labels=seg_meta.labels,
        model_name=seg_meta.model_name,
        model_version=f"0.0.0+{seg_meta.model_version}+{cls_version}",
        training={
            "composed": {
                "encoder_and_segmentation": source(segmentation_from, seg_meta),
                "classification": cls_sources[0] if single else cls_sources,
                "classifier_flip": flip,
            },
            "experiment": cls_meta.training.get("experiment", "composed"),
            "data": cls_meta.training.get("data", {}),
        },
    )
    return save_checkpoint(model, meta, out)


ONNX_OPSET = 17
ONNX_MISSING = "ONNX export needs the onnx package: pip install 'ctmtl[onnx]'"


class OnnxHeads(nn.Module):
    """The inference heads as one graph, probabilities out (sigmoid applied).

    Inputs, each (N, C, S, S) in [0, 1] on the network grid: ``image`` (the whole slice,
    preprocessed as ``mtl_model.Predictor`` does); where the checkpoint's classifier sees
    the lung box (``classifier_input = "lung_box"``), ``classifier_image`` too (the slice
    cut to the series' lung box, air outside, then resized). Outputs: ``lesion_probability``
    (N, 1, S, S) and ``covid_probability`` (N,), as far as the checkpoint has the heads.
    """

    def __init__(self, model: nn.Module, meta: CheckpointMetadata) -> None:
        super().__init__()
        arch = meta.architecture
        self.tasks = [t for t in INFERENCE_TASKS if t in arch.tasks]
        self.separate = (
            meta.preprocessing.classifier_input == "lung_box" and "classification" in self.tasks
        )
        self.classifier_only = arch.name == "cnn8"
        self.model = model
        self.classifier: nn.Module | None = None
        if self.separate and not self.classifier_only:
            head = model.classification
            assert isinstance(head, nn.Module)
            self.classifier = head
            self.model = copy.deepcopy(model)  # the lesion path alone
            self.model.classification = None  # type: ignore[assignment]

    @property
    def input_names(self) -> list[str]:
        if self.classifier_only:
            return ["classifier_image" if self.separate else "image"]
        return ["image", "classifier_image"] if self.separate else ["image"]

    @property
    def output_names(self) -> list[str]:
        names = {"segmentation": "lesion_probability", "classification": "covid_probability"}
        return [names[t] for t in self.tasks]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(inputs[0])
        res: list[torch.Tensor] = []
        if "segmentation" in self.tasks:
            res.append(torch.sigmoid(out["segmentation"]))
        if "classification" in self.tasks:
            if self.classifier is not None:
                logit = self.classifier(inputs[1])["classification"]
            else:
                logit = out["classification"]
            res.append(torch.sigmoid(logit))
        return tuple(res)


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Write a checkpoint's inference heads as ONNX (``OnnxHeads``); returns the path.

    The checkpoint's metadata JSON goes into the ONNX metadata (key ``ctmtl``), so the
    file says how to preprocess its inputs and what its outputs mean. Batch is dynamic.
    """
    try:
        import onnx
    except ImportError as exc:
        raise RuntimeError(ONNX_MISSING) from exc
    src = Path(checkpoint)
    model, meta = load_checkpoint(src, device="cpu")
    keep = [t for t in meta.architecture.tasks if t in INFERENCE_TASKS]
    if not keep:
        raise CheckpointError(f"checkpoint {src} has no inference head")
    inf = meta.architecture.build(keep)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("reconstruction.")}
    inf.load_state_dict(state, strict=True)
    meta = meta.model_copy(
        update={"architecture": meta.architecture.model_copy(update={"tasks": keep})}
    )
    heads = OnnxHeads(inf.eval(), meta).eval()
    arch = meta.architecture
    example = tuple(
        torch.zeros(1, arch.in_channels, arch.input_size, arch.input_size)
        for _ in heads.input_names
    )
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    names = heads.input_names + heads.output_names
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is "legacy"
        torch.onnx.export(
            heads,
            example,
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=heads.input_names,
            output_names=heads.output_names,
            dynamic_axes={n: {0: "batch"} for n in names},
        )
    try:
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        for key, value in (
            ("ctmtl", meta.model_dump_json()),
            ("inputs", OnnxHeads.__doc__ or ""),
        ):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = f"{meta.model_name} {meta.model_version} (ctmtl-train export)"
        onnx.save(proto, str(tmp))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info(
        "wrote ONNX %s (%.1f MiB; inputs %s, outputs %s)",
        out_path,
        out_path.stat().st_size / 2**20,
        heads.input_names,
        heads.output_names,
    )
    return out_path


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else "n/a"
