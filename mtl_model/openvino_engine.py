"""The Predictor's optional OpenVINO engine (CPU): fp32, bf16, or int8 by NNCF.

``pip install 'ctmtl[openvino]'`` adds OpenVINO and NNCF; torch stays the reference and
the GPU path (``mtl_model.predictor``). Each of the Predictor's networks (the lesion
network, and the classifier where it has an input of its own) is traced with
``torch.jit.trace`` and converted with ``openvino.convert_model`` (batch dimension
dynamic; BatchNorm is folded by OpenVINO).

int8: NNCF post-training quantisation (``nncf.quantize``: symmetric int8 weights and
activations, with full bias correction) of the lesion network on real calibration slices
(``mtl_model.calibration``) that went through the Predictor's own preprocessing. Two
layers stay in floating point, chosen on the shipped checkpoint (README, Benchmarks):

* the first convolution, whose input is the image itself (and any Dense layer, i.e. a
  classifier head on the encoder): quantising the image's intensities and NNCF's fast bias
  correction cost about 0.007 MedSeg val Dice, this setting about 0.001;
* a classifier with an input of its own (the shipped 8-layer CNN on the lung box) is not
  quantised at all: int8 moved slice COVID probabilities by up to 0.10 and a series figure
  by 0.10, for about 1 % of the arithmetic.

Building takes a while (the int8 engine of the shipped checkpoint: one to two minutes on
two cores, mostly running the network over the calibration slices for the statistics and
the bias correction), so it is done once and cached, by default under env
``CTMTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctmtl``, else ``~/.cache/ctmtl``:
``openvino/<device UID>/ov<version>-<precision>-<key>/`` holds one IR pair (``.xml`` +
``.bin``) per network and ``manifest.json``. The key digests everything the build depends
on: the checkpoint's device UID and version, a digest of the weights, the OpenVINO (and
NNCF) version, the precision, the calibration file list and this module's build settings.
The manifest repeats the key and the SHA-256 of every file; an entry whose manifest is
missing, unreadable or different, whose files do not hash to the manifest, or that
OpenVINO cannot read or compile is deleted and rebuilt, never used. Entries are written to
a temporary folder and renamed into place, so a crash or a second worker building at the
same time never leaves a half-written entry under the final name. Where the cache folder
cannot be written the engine is built in memory and a warning says so (every start then
builds again).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

#: bump when the conversion or quantisation settings change: old cache entries go stale
ENGINE_BUILD_VERSION = 1
#: networks that int8 leaves in floating point (see the module docstring)
NOT_QUANTISED = ("classifier",)
MANIFEST = "manifest.json"
IR_PRECISIONS = ("fp32", "int8")

OPENVINO_MISSING = (
    "model engine 'openvino' needs the OpenVINO runtime, which is not installed in this "
    "Python environment; install the extra (pip install 'ctmtl[openvino]', or "
    'scripts/setup.sh --dev) or set engine = "torch" (or "auto")'
)
NNCF_MISSING = (
    "int8 with the OpenVINO engine needs NNCF, which is not installed; install the extra "
    "(pip install 'ctmtl[openvino]') or choose precision fp32 or bf16"
)


class EngineError(RuntimeError):
    """The OpenVINO engine cannot be used as asked (missing package, no calibration, ...)."""


def openvino_version() -> str | None:
    """The installed OpenVINO runtime's version, or None where it cannot be imported."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return str(ov.get_version())


def openvino_available() -> bool:
    return openvino_version() is not None


def nncf_version() -> str | None:
    try:
        import nncf
    except ImportError:
        return None
    return str(getattr(nncf, "__version__", "unknown"))


def default_cache_dir() -> Path:
    """Env ``CTMTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctmtl``, else ``~/.cache/ctmtl``."""
    env = os.environ.get("CTMTL_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ctmtl"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(networks: Mapping[str, nn.Module]) -> str:
    """SHA-256 over every network's state dict (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name in sorted(networks):
        for key, t in networks[name].state_dict().items():
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Outputs(nn.Module):
    """A network as a tuple of tensors in a fixed order (what tracing wants)."""

    def __init__(self, net: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.names = tuple(names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        if isinstance(out, dict):
            return tuple(out[n] for n in self.names)
        return (out,)


def output_names(net: nn.Module, example: torch.Tensor) -> tuple[str, ...]:
    """The head names a network returns (a bare tensor counts as ``classification``)."""
    with torch.inference_mode():
        out = net(example)
    if isinstance(out, dict):
        return tuple(out)
    return ("classification",)


class OpenVINONetwork:
    """A compiled OpenVINO network called like the torch one: (N, C, S, S) -> {head: logits}."""

    def __init__(self, compiled: Any, outputs: Sequence[str]) -> None:
        self.compiled = compiled
        self.outputs = tuple(outputs)
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        with self._lock:
            self._request.infer({0: arr})
            return {
                name: torch.from_numpy(np.array(self._request.get_output_tensor(i).data))
                for i, name in enumerate(self.outputs)
            }


@dataclass
class BuildRequest:
    """What to build: the networks, their identity and how to get calibration inputs."""

    networks: Mapping[str, nn.Module]
    device_uid: str
    model_version: str
    in_channels: int
    input_size: int
    ir_precision: str
    #: name -> per-slice network inputs (1, C, S, S); called only when int8 is built
    calibration: Callable[[], Mapping[str, Sequence[np.ndarray]]] | None = None
    calibration_id: str | None = None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]


def _compile_config(inference_precision: str, threads: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if inference_precision == "bf16" else "f32",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class EngineCache:
    """Builds, verifies, stores and loads the OpenVINO networks of one checkpoint."""

    def __init__(self, request: BuildRequest, cache_dir: Path | None = None) -> None:
        if request.ir_precision not in IR_PRECISIONS:
            raise ValueError(f"IR precision must be one of {IR_PRECISIONS}")
        version = openvino_version()
        if version is None:
            raise EngineError(OPENVINO_MISSING)
        self.request = request
        self.ov_version = version
        self.key: dict[str, Any] = {
            "build": ENGINE_BUILD_VERSION,
            "device_uid": request.device_uid,
            "model_version": request.model_version,
            "weights_sha256": weights_digest(request.networks),
            "openvino": version,
            "ir_precision": request.ir_precision,
            "input": [request.in_channels, request.input_size, request.input_size],
            "networks": sorted(request.networks),
        }
        if request.ir_precision == "int8":
            nv = nncf_version()
            if nv is None:
                raise EngineError(NNCF_MISSING)
            if request.calibration is None or request.calibration_id is None:
                raise EngineError("int8 needs calibration slices")
            self.key["nncf"] = nv
            self.key["calibration"] = request.calibration_id
            self.key["quantised"] = sorted(n for n in request.networks if n not in NOT_QUANTISED)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.entry = (
            self.cache_dir
            / "openvino"
            / _safe(request.device_uid)
            / f"ov{_safe(version.split('-')[0])}-{request.ir_precision}-{digest[:16]}"
        )

    # ------------------------------------------------------------------ load / verify

    def verify(self, entry: Path | None = None) -> dict[str, Any]:
        """The manifest of a complete, unchanged entry; raises ``EngineError`` otherwise."""
        entry = entry or self.entry
        try:
            manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"no readable manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("key") != self.key:
            raise EngineError("manifest key differs from this checkpoint and runtime")
        files = manifest.get("files")
        networks = manifest.get("networks")
        if not isinstance(files, dict) or not isinstance(networks, dict):
            raise EngineError("manifest lists no files")
        if sorted(networks) != sorted(self.request.networks):
            raise EngineError("manifest lists other networks")
        for name in networks:
            for suffix in (".xml", ".bin"):
                if f"{name}{suffix}" not in files:
                    raise EngineError(f"manifest lacks {name}{suffix}")
        for fname, digest in files.items():
            path = entry / fname
            if not path.is_file():
                raise EngineError(f"{fname} is missing")
            if _sha256(path) != digest:
                raise EngineError(f"{fname} does not match its SHA-256 in the manifest")
        return manifest

    def _compile(
        self,
        models: Mapping[str, Any],
        outputs: Mapping[str, Sequence[str]],
        config: dict[str, Any],
    ) -> dict[str, OpenVINONetwork]:
        import openvino as ov

        core = ov.Core()
        return {
            name: OpenVINONetwork(core.compile_model(models[name], "CPU", config), outputs[name])
            for name in self.request.networks
        }

    def load(
        self, inference_precision: str = "fp32", threads: int | None = None
    ) -> dict[str, OpenVINONetwork]:
        """The compiled networks: from a verified cache entry, else built (and stored)."""
        import openvino as ov

        config = _compile_config(inference_precision, threads)
        if self.entry.exists():
            try:
                manifest = self.verify()
                core = ov.Core()
                models = {n: core.read_model(self.entry / f"{n}.xml") for n in manifest["networks"]}
                nets = self._compile(models, manifest["networks"], config)
                logger.info("OpenVINO engine loaded from cache %s", self.entry)
                return nets
            except Exception as exc:  # a corrupt or stale entry is rebuilt, never trusted
                logger.warning(
                    "OpenVINO engine cache %s is unusable (%s); rebuilding it", self.entry, exc
                )
                shutil.rmtree(self.entry, ignore_errors=True)
        models, outputs = self.build()
        self._store(models, outputs)
        return self._compile(models, outputs, config)

    # ------------------------------------------------------------------ build / store

    def build(self) -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
        """Convert (and for int8 quantise) every network; returns OpenVINO models."""
        import openvino as ov

        req = self.request
        t0 = time.perf_counter()
        example = torch.zeros(1, req.in_channels, req.input_size, req.input_size)
        models: dict[str, Any] = {}
        outputs: dict[str, tuple[str, ...]] = {}
        calib: Mapping[str, Sequence[np.ndarray]] | None = None
        quantised = self.key.get("quantised", [])
        if quantised:
            assert req.calibration is not None
            calib = req.calibration()
        for name, net in req.networks.items():
            net = net.eval().float()
            names = output_names(net, example)
            wrapper = _Outputs(net, names).eval()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(wrapper, example, check_trace=False)
                model = ov.convert_model(
                    traced,
                    example_input=example,
                    input=[(-1, req.in_channels, req.input_size, req.input_size)],
                )
            for i, out_name in enumerate(names):
                model.outputs[i].get_tensor().set_names({out_name})
            if calib is not None and name in quantised:
                model = self._quantize(model, calib[name], name)
            models[name] = model
            outputs[name] = names
        logger.info(
            "OpenVINO %s engine built in %.1f s (%s)",
            req.ir_precision,
            time.perf_counter() - t0,
            ", ".join(req.networks),
        )
        return models, outputs

    @staticmethod
    def _quantize(model: Any, inputs: Sequence[np.ndarray], name: str) -> Any:
        import nncf

        convs = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
        ignored = nncf.IgnoredScope(
            names=[convs[0].get_friendly_name()] if convs else [],
            types=["MatMul"],
            validate=False,
        )
        nncf_logger = logging.getLogger("nncf")
        level = nncf_logger.level
        nncf_logger.setLevel(logging.WARNING)
        try:
            data = nncf.Dataset([np.ascontiguousarray(x, dtype=np.float32) for x in inputs])
            # NNCF draws progress bars on stdout, which carries the CLIs' JSON
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                q = nncf.quantize(
                    model,
                    data,
                    subset_size=len(inputs),
                    fast_bias_correction=False,
                    ignored_scope=ignored,
                )
        finally:
            nncf_logger.setLevel(level)
        logger.info("quantised %s to int8 on %d calibration slices", name, len(inputs))
        return q

    def _store(self, models: Mapping[str, Any], outputs: Mapping[str, Sequence[str]]) -> None:
        import openvino as ov

        try:
            self.entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.entry.name}.", dir=self.entry.parent))
        except OSError as exc:
            logger.warning(
                "OpenVINO engine cache folder %s is not writable (%s): the engine is built "
                "again at every start; set CTMTL_CACHE_DIR to a writable folder",
                self.cache_dir,
                exc,
            )
            return
        try:
            files: dict[str, str] = {}
            for name, model in models.items():
                ov.save_model(model, tmp / f"{name}.xml", compress_to_fp16=False)
                for suffix in (".xml", ".bin"):
                    files[f"{name}{suffix}"] = _sha256(tmp / f"{name}{suffix}")
            manifest = {
                "key": self.key,
                "files": files,
                "networks": {n: list(o) for n, o in outputs.items()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            try:
                os.rename(tmp, self.entry)
            except OSError:
                # another process stored the same entry meanwhile: keep one verified copy
                try:
                    self.verify()
                except EngineError:
                    shutil.rmtree(self.entry, ignore_errors=True)
                    os.rename(tmp, self.entry)
            logger.info("OpenVINO engine cached in %s", self.entry)
        except OSError as exc:
            logger.warning("could not cache the OpenVINO engine in %s: %s", self.entry, exc)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
