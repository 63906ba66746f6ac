"""Slice-wise inference for a whole series: build once, run batched, return source-grid maps.

Following nnU-Net's predictor: the network is built and loaded once, moved to the device
once, and every call runs under ``torch.inference_mode()``. Preprocessing (window, resize)
and the resize of the probability map back to the source grid run on the model's device
inside the same batch loop, so a series never makes a round trip through the CPU per stage.
The node asks for the lesion mask (``lesion_threshold``). It is thresholded on the device
and, with the slice probabilities, stays there until the last batch, so a GPU is never
stopped by a copy back between batches and returns a boolean volume, not the fp32 map; the
slices go up from pinned memory without blocking.

Precision: ``auto`` picks bf16 weights and activations where the hardware has native bf16
matrix units (CUDA GPUs with bf16, CPUs with AMX or AVX512-BF16) and fp32 elsewhere. BatchNorm
is folded into the convolutions and tensors use channels_last; on this CPU that ran faster
than bf16 autocast, which keeps BatchNorm in fp32 and re-casts the weights every batch.
How far bf16 (and the OpenVINO engine) moves the outputs from fp32, with the shipped weights
on real slices, is what ``benchmarks/predictor.py --compare`` measures; the figures are in
README.md (Benchmarks).

Engine: ``torch`` (the default here, the reference, and the only one on a GPU) or
``openvino`` (``pip install 'ctmtl[openvino]'``; CPU only; ``mtl_model.openvino_engine``),
whose ``auto`` precision is int8 by NNCF post-training quantisation calibrated on real
slices (``mtl_model.calibration``; fp32 with a warning where no calibration slices are
found), built once per checkpoint and cached. ``auto`` picks OpenVINO on a CPU where it is
installed (and ``compile`` is off), torch otherwise. The outputs have the same form
whichever engine runs.

Series-level COVID probability (``aggregate_series``): the mean of the top 10% slice
probabilities (at least one slice) among the slices the caller marks as relevant (the
node passes the slices that contain lung), else among all slices. COVID-19 findings are
focal, so a mean over all slices dilutes a positive series with normal apical and basal
slices, while the single maximum follows one noisy slice; the top-decile mean sits between.
The rule was kept after the developer data of issue 12 (docs/experiments.md, seventh
session): on the held-out series what moved the verdict was the classifier's input, not
the aggregation. The lesion burden is not folded in: on UCSD, the only developer data
with both classes, it has no signal (AUC 0.47-0.53, twelfth session,
``scripts/burden_probe.py``), so a rule would have had to be tuned on the very series it
is scored on.

Classifier input: a checkpoint whose preprocessing says ``classifier_input = "lung_box"``
(only with the ``image_cnn8`` classifier, which has an input of its own) classifies each
slice cut to the series' lung box (``mtl_model.preprocessing.lung_box``) when the caller
passes the lung mask (the node always does); without one (2-D images such as the UCSD
figures, which are cut to the chest already) it sees the whole slice. The lesion decoder
always sees the whole slice.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mtl_model.checkpoint import CheckpointMetadata, load_checkpoint
from mtl_model.network import model_tasks
from mtl_model.openvino_engine import OPENVINO_MISSING, EngineError, openvino_available
from mtl_model.preprocessing import (
    AIR_HU,
    HUWindow,
    LungBox,
    crop_to_box,
    hu_to_unit,
    lung_box,
    resize_slices,
)

if TYPE_CHECKING:
    from mtl_model.calibration import CalibrationSource

logger = logging.getLogger(__name__)

TOP_FRACTION = 0.10
ENGINES = ("auto", "torch", "openvino")
PRECISIONS = ("auto", "bf16", "fp32", "int8")

#: a network as the predictor calls it: (N, C, S, S) -> {head: logits} (or the logits)
Network = Callable[[torch.Tensor], Any]


@dataclass
class Prediction:
    """Outputs for one series, on the source grid. Heads absent from the model give None."""

    lesion_probability: np.ndarray | None
    slice_covid_probability: np.ndarray | None
    series_covid_probability: float | None
    # with ``lesion_threshold``: probability >= threshold, thresholded where the network ran
    # (then ``lesion_probability`` is None)
    lesion_mask: np.ndarray | None = None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit ``cuda`` without one is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix work is native (fast) on ``device``."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        avx = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool((amx is not None and amx()) or (avx is not None and avx()))
    return False


def resolve_engine(
    engine: str = "auto", device: str | torch.device = "cpu", compile: bool = False
) -> str:
    """``auto`` -> ``openvino`` on a CPU where OpenVINO is installed (and torch.compile is
    not asked for), else ``torch``. ``openvino`` without the package, or on another
    device than the CPU, is an error that says what to do."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if engine == "torch":
        return "torch"
    if engine == "openvino":
        if dev.type != "cpu":
            raise ValueError(f"the OpenVINO engine runs on the CPU, not on device {dev}")
        if not openvino_available():
            raise EngineError(OPENVINO_MISSING)
        return "openvino"
    if dev.type == "cpu" and not compile and openvino_available():
        return "openvino"
    return "torch"


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the preceding convolutions (exact in fp32, faster).

    Returns the model unchanged where symbolic tracing is not possible.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model, inplace=False)
    except Exception as exc:  # tracing is best-effort; the unfused model is still correct
        logger.debug("BatchNorm folding skipped: %s", exc)
        return model
    fused.tasks = model_tasks(model)  # type: ignore[assignment]
    return fused


#: Slices per forward pass when the caller does not say. On a CPU a larger batch is no
#: faster and costs memory: the width-64 network through OpenVINO int8 ran 10.1 / 10.6 /
#: 10.2 / 10.4 slices/s at batch 16 / 8 / 4 / 2 with peaks of 1,915 / 1,312 / 993 / 846
#: MiB; torch bf16 7.3 / 7.7 / 9.0 slices/s at 16 / 4 / 2 with 1,337 / 814 / 755 MiB
#: (2-core Intel Xeon with AMX, 64 slices of 512 x 512, eleventh session).
CPU_BATCH = 2
#: On a GPU the batch keeps the device busy (16 is what the GPU end-to-end runs used).
ACCELERATOR_BATCH = 16


class Predictor:
    """Runs a checkpoint's segmentation and classification heads over series of slices."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        compile: bool = False,
        *,
        engine: str = "torch",
        calibration: str | Path | CalibrationSource | None = None,
        cache_dir: str | Path | None = None,
        model: nn.Module | None = None,
        metadata: CheckpointMetadata | None = None,
    ) -> None:
        """``engine``: ``torch`` | ``openvino`` | ``auto`` (module docstring). ``precision``:
        ``auto`` | ``bf16`` | ``fp32`` | ``int8`` (int8: OpenVINO only, its ``auto``).
        ``calibration`` (int8): a folder of calibration slices or a ``CalibrationSource``
        (default: ``mtl_model.calibration.calibration_source()``). ``cache_dir``: where the
        OpenVINO engine is cached (default: ``mtl_model.openvino_engine.default_cache_dir()``).
        ``batch_size``: slices per forward pass; None picks ``CPU_BATCH`` on a CPU and
        ``ACCELERATOR_BATCH`` elsewhere.
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        self.engine = resolve_engine(engine, self.device, compile)
        if self.engine == "torch" and precision == "int8":
            hint = "" if engine == "torch" else f" ({OPENVINO_MISSING})"
            raise EngineError(f"precision int8 needs the OpenVINO engine{hint}")
        if model is None:
            model, metadata = load_checkpoint(checkpoint, device="cpu")
        elif metadata is None:
            raise ValueError("metadata is required with an explicit model")
        assert metadata is not None
        self.metadata = metadata
        self.tasks = model_tasks(model)
        if "segmentation" not in self.tasks and "classification" not in self.tasks:
            raise ValueError("the model has neither a segmentation nor a classification head")
        if precision == "auto" and self.engine == "torch":
            precision = "bf16" if native_bf16(self.device) else "fp32"
        if batch_size is None:
            batch_size = CPU_BATCH if self.device.type == "cpu" else ACCELERATOR_BATCH
        self.batch_size = batch_size
        self.input_size = metadata.architecture.input_size
        pre = metadata.preprocessing
        self.window = HUWindow(pre.hu_window_center, pre.hu_window_width)
        torch_bf16 = precision == "bf16" and self.engine == "torch"
        self.dtype = torch.bfloat16 if torch_bf16 else torch.float32
        self.air = float(hu_to_unit(torch.tensor(AIR_HU), self.window))
        self.lung_box_margin = pre.lung_box_margin
        self.classifier: Network | None = None
        self.model: Network | None = None
        self.engine_cache: Path | None = None  # the OpenVINO engine's cache entry
        # the networks to run: "model" (the lesion path, or the whole model) and
        # "classifier" (where the classifier sees the lung box, so has an input of its own)
        parts: dict[str, nn.Module] = {}
        arch = metadata.architecture
        if pre.classifier_input == "lung_box" and "classification" in self.tasks:
            if arch.name == "cnn8":
                parts["classifier"] = model
            elif arch.classifier_pooling == "image_cnn8":
                rest = copy.deepcopy(model)  # the caller's model keeps its classifier
                head = rest.classification
                assert isinstance(head, nn.Module)
                parts["classifier"] = head
                rest.classification = None  # type: ignore[assignment]  # lesion path alone
                parts["model"] = rest
            else:
                raise ValueError("classifier_input 'lung_box' needs the image_cnn8 classifier")
        else:
            parts["model"] = model
        if self.engine == "openvino":
            if compile:
                logger.info("compile applies to the torch engine only; ignored for OpenVINO")
            nets, precision = self._openvino(parts, precision, calibration, cache_dir)
            self.model, self.classifier = nets.get("model"), nets.get("classifier")
        else:
            self.model = self._prepare(parts["model"], compile) if "model" in parts else None
            if "classifier" in parts:
                self.classifier = self._prepare(parts["classifier"], compile)
        self.precision = precision
        logger.info(
            "predictor ready: %s %s on %s, %s %s, batch %d%s",
            metadata.model_name,
            metadata.model_version,
            self.device,
            self.engine,
            self.precision,
            batch_size,
            ", compiled" if compile and self.engine == "torch" else "",
        )

    def _openvino(
        self,
        parts: Mapping[str, nn.Module],
        precision: str,
        calibration: str | Path | CalibrationSource | None,
        cache_dir: str | Path | None,
    ) -> tuple[dict[str, Network], str]:
        """The OpenVINO networks (built or from the cache) and the precision they run at."""
        from mtl_model.calibration import CalibrationError, CalibrationSource, calibration_source
        from mtl_model.openvino_engine import (
            NNCF_MISSING,
            NOT_QUANTISED,
            BuildRequest,
            EngineCache,
            EngineError,
            nncf_version,
        )

        source = None
        if precision in ("auto", "int8") and all(n in NOT_QUANTISED for n in parts):
            logger.info("nothing to quantise in this checkpoint; the OpenVINO engine runs fp32")
            precision = "fp32"
        if precision in ("auto", "int8"):
            try:
                if nncf_version() is None:
                    raise EngineError(NNCF_MISSING)
                if isinstance(calibration, CalibrationSource):
                    source = calibration
                else:
                    source = calibration_source(calibration)
            except (CalibrationError, EngineError) as exc:
                if precision == "int8":
                    raise EngineError(f"cannot build the int8 OpenVINO engine: {exc}") from exc
                logger.warning("OpenVINO engine runs fp32, not int8: %s", exc)
                precision = "fp32"
            else:
                precision = "int8"
        meta = self.metadata
        arch = meta.architecture
        request = BuildRequest(
            networks=parts,
            device_uid=meta.device_uid,
            model_version=meta.model_version,
            in_channels=arch.in_channels,
            input_size=self.input_size,
            ir_precision="int8" if precision == "int8" else "fp32",
        )
        if source is not None:
            src = source
            request.calibration_id = src.ident
            request.calibration = lambda: self._calibration_inputs(src.load(), list(parts))
            logger.info("int8 calibration: %s", src.describe())
        cache = EngineCache(request, Path(cache_dir) if cache_dir is not None else None)
        nets = cache.load("bf16" if precision == "bf16" else "fp32", torch.get_num_threads())
        self.engine_cache = cache.entry if (cache.entry / "manifest.json").is_file() else None
        return dict(nets), precision

    def _calibration_inputs(
        self, series: Sequence[Any], names: Sequence[str]
    ) -> dict[str, list[np.ndarray]]:
        """Per-slice network inputs (1, C, S, S) of calibration series, preprocessed as in
        :meth:`_predict` (the classifier: the series' lung box where it has a lung mask)."""
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for s in series:
            full = torch.from_numpy(np.ascontiguousarray(s.images, dtype=np.float32))
            full = full.clamp(0.0, 1.0).unsqueeze(1)
            if "model" in out:
                x = resize_slices(full, self.input_size).float()
                out["model"] += [a[None] for a in x.numpy()]
            if "classifier" in out:
                box = lung_box(s.lung, self.lung_box_margin) if s.lung is not None else None
                cut = crop_to_box(full, box, self.air) if box is not None else full
                c = resize_slices(cut, self.input_size).float()
                out["classifier"] += [a[None] for a in c.numpy()]
        return out

    def _prepare(self, model: nn.Module, compile: bool) -> nn.Module:
        model = fold_batchnorm(model.eval()).to(self.device, self.dtype)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return torch.compile(model) if compile else model  # type: ignore[return-value]

    @classmethod
    def from_model(
        cls, model: nn.Module, metadata: CheckpointMetadata, **kwargs: object
    ) -> Predictor:
        """A predictor around an in-memory model (training-time evaluation, tests)."""
        return cls(model=model, metadata=metadata, **kwargs)  # type: ignore[arg-type]

    def predict_hu(
        self,
        volume: np.ndarray,
        slice_mask: np.ndarray | None = None,
        lung_mask: np.ndarray | None = None,
        lesion_threshold: float | None = None,
    ) -> Prediction:
        """Predict a (Z, Y, X) volume in Hounsfield units.

        ``slice_mask`` (Z,) marks the slices the series figure is taken over (default: the
        slices ``lung_mask`` has lung in); ``lung_mask`` (Z, Y, X) gives the classifier
        its lung box where the checkpoint asks for one. With ``lesion_threshold`` the
        lesion output is ``lesion_mask`` instead of the probability map, thresholded on the
        device and kept there until the series is done: a GPU sends one boolean volume back
        (a quarter of the fp32 map) and never waits for a copy between batches.
        """
        return self._predict(volume, True, slice_mask, lung_mask, lesion_threshold)

    def predict_unit(
        self,
        images: np.ndarray,
        slice_mask: np.ndarray | None = None,
        lung_mask: np.ndarray | None = None,
    ) -> Prediction:
        """Predict (Z, Y, X) images already scaled to [0, 1] (e.g. 8-bit PNG / 255)."""
        return self._predict(images, False, slice_mask, lung_mask)

    def warm_up(self, rows: int = 512, columns: int = 512) -> float:
        """One batch of a blank series through every network, at start: the first real
        series then pays no CUDA / cuDNN set-up, compilation or engine first-run cost
        (about 0.4 s on an H200, where a 300-slice series takes about 1 s). Returns the
        seconds it took."""
        t0 = time.perf_counter()
        volume = np.full((self.batch_size, rows, columns), AIR_HU, dtype=np.float32)
        lung = np.zeros(volume.shape, dtype=bool)
        lung[:, rows // 4 : 3 * rows // 4, columns // 4 : 3 * columns // 4] = True
        self.predict_hu(volume, lung_mask=lung)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        logger.info("predictor warmed up in %.2f s (batch %d)", seconds, self.batch_size)
        return seconds

    def _network_input(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_slices(x, self.input_size)
        if self.engine != "torch":
            return x.float().contiguous()
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def aggregate_series(slice_probs: np.ndarray, slice_mask: np.ndarray | None = None) -> float:
        """Series COVID probability: mean of the top 10% (>= 1) relevant slice probabilities."""
        probs = np.asarray(slice_probs, dtype=np.float64)
        if probs.ndim != 1 or probs.size == 0:
            raise ValueError("slice_probs must be a non-empty 1-D array")
        if slice_mask is not None:
            mask = np.asarray(slice_mask, dtype=bool)
            if mask.shape != probs.shape:
                raise ValueError(f"slice_mask shape {mask.shape} != {probs.shape}")
            if mask.any():
                probs = probs[mask]
        k = max(1, math.ceil(TOP_FRACTION * probs.size))
        return float(np.sort(probs)[-k:].mean())

    def _predict(
        self,
        volume: np.ndarray,
        hu: bool,
        slice_mask: np.ndarray | None,
        lung_mask: np.ndarray | None,
        lesion_threshold: float | None = None,
    ) -> Prediction:
        arr = np.asarray(volume)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] == 0:
            raise ValueError(f"expected a (Z, Y, X) volume, got shape {arr.shape}")
        box: LungBox | None = None
        if lung_mask is not None:
            lung = np.asarray(lung_mask, dtype=bool).reshape(arr.shape)
            if slice_mask is None:
                slice_mask = np.asarray(lung.any(axis=(1, 2)))
            if self.classifier is not None:
                box = lung_box(lung, self.lung_box_margin)
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise TypeError(f"expected a real numeric volume, got {arr.dtype}")
        if arr.dtype not in (np.float32, np.int16, np.uint8, np.int32, np.uint16, np.float64):
            arr = arr.astype(np.float32)
        n, height, width = arr.shape
        seg = "segmentation" in self.tasks
        cls = "classification" in self.tasks
        cuda = self.device.type == "cuda"
        on_device = seg and lesion_threshold is not None
        level = float(lesion_threshold) if lesion_threshold is not None else 0.0
        lesion = np.empty((n, height, width), dtype=np.float32) if seg and not on_device else None
        with torch.inference_mode():
            # on the device until the series is done: no copy back between batches
            mask_dev = (
                torch.empty((n, height, width), dtype=torch.bool, device=self.device)
                if on_device
                else None
            )
            probs_dev = torch.empty(n, dtype=torch.float32, device=self.device) if cls else None
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                x = torch.from_numpy(np.ascontiguousarray(arr[start:stop]))
                # pinned, so that the copy to the GPU runs while the last batch computes
                x = x.pin_memory().to(self.device, non_blocking=True) if cuda else x
                x = hu_to_unit(x, self.window) if hu else x.float().clamp_(0.0, 1.0)
                full = x.unsqueeze(1)
                x = self._network_input(full)
                out = self.model(x) if self.model is not None else {}
                if self.classifier is not None:
                    cut = crop_to_box(full, box, self.air) if box is not None else full
                    cls_out = self.classifier(self._network_input(cut))
                    out["classification"] = (
                        cls_out["classification"] if isinstance(cls_out, dict) else cls_out
                    )
                if seg:
                    prob = torch.sigmoid(out["segmentation"].float())
                    prob = resize_slices(prob, (height, width)).clamp_(0.0, 1.0)
                    if mask_dev is not None:
                        mask_dev[start:stop] = prob[:, 0] >= level
                    elif lesion is not None:
                        lesion[start:stop] = prob[:, 0].cpu().numpy()
                if probs_dev is not None:
                    probs_dev[start:stop] = torch.sigmoid(out["classification"].float())
            lesion_mask = mask_dev.cpu().numpy() if mask_dev is not None else None
            slice_probs = probs_dev.cpu().numpy() if probs_dev is not None else None
        series = self.aggregate_series(slice_probs, slice_mask) if slice_probs is not None else None
        return Prediction(lesion, slice_probs, series, lesion_mask)
