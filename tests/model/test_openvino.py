"""Issue 14: the Predictor's optional OpenVINO engine (int8 by NNCF), its cache, and the
default install without it.

Real parts only: the shipped checkpoint on a real CT series (Lung-PET-CT-Dx, never in the
calibration set) against torch fp32; real OpenVINO/NNCF builds; "not installed" is a
subprocess whose interpreter cannot import openvino or nncf (a sitecustomize that blocks
the import), not a mock of our code. Tests that need OpenVINO skip with the reason where
it is not installed (``scripts/setup.sh --dev`` installs it, so CI runs them).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import NONCOVID_SERIES, REPO, save_tiny_checkpoint, tiny_model
from mtl_model import CheckpointMetadata, Prediction, Predictor, build_model
from mtl_model.calibration import calibration_source
from mtl_model.openvino_engine import (
    MANIFEST,
    OPENVINO_MISSING,
    EngineError,
    nncf_version,
    openvino_available,
)
from mtl_model.predictor import resolve_engine

needs_openvino = pytest.mark.skipif(
    not openvino_available() or nncf_version() is None,
    reason="OpenVINO/NNCF not installed (pip install 'ctmtl[openvino]')",
)

BLOCK_OPENVINO = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.partition(".")[0] in ("openvino", "nncf"):
                raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
            return None

    sys.meta_path.insert(0, _NotInstalled())
    """
)


def without_openvino(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` in an interpreter where openvino and nncf cannot be imported."""
    site = tmp_path / "no_openvino"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_OPENVINO)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CTMTL_MODEL__ENGINE", None)  # the config file's engine counts here
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(REPO / "tests"), *filter(None, [env.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )


# --------------------------------------------------------------------------- no openvino


def test_default_install_without_openvino_works(tmp_path: Path, tiny_checkpoint: Path) -> None:
    code = textwrap.dedent(
        f"""
        import json, numpy as np
        try:
            import openvino  # noqa: F401
            raise SystemExit("openvino importable")
        except ImportError:
            pass
        from mtl_model import Predictor
        from mtl_model.predictor import resolve_engine
        from dicom_node.config import load_config
        from dicom_node.worker import build_predictor
        cfg = load_config(None, environ={{}}, overrides={{"model": {{
            "checkpoint": {str(tiny_checkpoint)!r}, "device": "cpu"}}}})
        assert cfg.model.engine == "auto"
        p = build_predictor(cfg)  # engine auto -> torch
        vol = np.random.default_rng(0).integers(-1000, 200, (3, 96, 96)).astype(np.int16)
        pred = p.predict_hu(vol)
        q = Predictor({str(tiny_checkpoint)!r}, device="cpu", engine="auto")
        print(json.dumps({{"engine": p.engine, "precision": p.precision, "q": q.engine,
                           "resolved": resolve_engine("auto", "cpu"),
                           "shape": list(pred.lesion_probability.shape)}}))
        """
    )
    proc = without_openvino(tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["engine"] == out["q"] == out["resolved"] == "torch"
    assert out["precision"] in ("fp32", "bf16") and out["shape"] == [3, 96, 96]


def test_engine_openvino_without_the_package_fails_at_start_clearly(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    code = textwrap.dedent(
        f"""
        from mtl_model import Predictor
        from mtl_model.openvino_engine import EngineError
        for kwargs in ({{"engine": "openvino"}}, {{"engine": "auto", "precision": "int8"}}):
            try:
                Predictor({str(tiny_checkpoint)!r}, device="cpu", **kwargs)
            except EngineError as exc:
                print("EngineError:", exc)
            else:
                raise SystemExit(f"no error for {{kwargs}}")
        """
    )
    proc = without_openvino(tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all("pip install 'ctmtl[openvino]'" in ln for ln in lines)
    assert OPENVINO_MISSING in lines[0]

    # the node: `ctmtl-node worker` stops at start, exit 2, one error line naming the key
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[spool]\npath = "{tmp_path / "spool"}"\nmin_free_mb = 0\n'
        f'[model]\ncheckpoint = "{tiny_checkpoint}"\ndevice = "cpu"\nengine = "openvino"\n'
    )
    proc = without_openvino(tmp_path, "-m", "dicom_node", "worker", "--config", str(cfg))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: model.engine: {OPENVINO_MISSING}"], proc.stderr


def test_engine_and_precision_are_checked() -> None:
    from dicom_node.config import ConfigError, load_config

    assert resolve_engine("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("tensorrt", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor.from_model(*_tiny(), precision="fp8")
    with pytest.raises(EngineError, match="int8 needs the OpenVINO engine"):
        Predictor.from_model(*_tiny(), engine="torch", precision="int8")
    if torch.cuda.is_available():
        assert resolve_engine("auto", "cuda") == "torch"
    cfg = load_config(None, environ={}, overrides={"model": {"engine": "openvino"}})
    assert cfg.model.engine == "openvino"
    with pytest.raises(ConfigError, match=r"model\.engine"):
        load_config(None, environ={}, overrides={"model": {"engine": "onnx"}})


def test_default_calibration_set_is_not_what_the_figures_are_measured_on(
    data_dir: Path,
) -> None:
    source = calibration_source(data_dir)
    assert source.n_slices == 32
    names = {g.name: g for g in source.groups}
    assert sorted(names) == ["luna16-patient_1", "medseg-train", "ucsd-train"]
    medseg = sorted((data_dir / "medseg-100" / "images").iterdir())
    val = {p.name for i, p in enumerate(medseg) if i % 5 == 0}
    assert not val & {f.name for f in names["medseg-train"].files}
    ucsd_val = set()
    for tag in ("COVID", "NonCOVID"):
        lst = data_dir / "covid-ct" / "split" / f"valCT_{tag}.txt"
        ucsd_val |= set(lst.read_text().split())
    assert not ucsd_val & {f.name for f in names["ucsd-train"].files}
    for f in (f for g in source.groups for f in g.files):
        rel = f.relative_to(data_dir).parts
        assert rel[0] in ("medseg-100", "covid-ct") or rel[:2] == ("luna16-3", "patient_1"), f
    assert len(source.ident) == 16 and source.ident == calibration_source(data_dir).ident


# --------------------------------------------------------------------------- openvino


def _tiny(
    size: int = 64, pooling: str = "max2x2_flatten", lung_box: bool = False
) -> tuple[torch.nn.Module, CheckpointMetadata]:
    torch.manual_seed(0)
    width = 4 if pooling == "image_cnn8" else None
    model = build_model(
        "mtl",
        4,
        size,
        tasks=["segmentation", "classification"],
        classifier_pooling=pooling,
        classifier_width=width,
    ).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    meta = CheckpointMetadata.model_validate(
        {
            "architecture": {
                "base_width": 4,
                "input_size": size,
                "tasks": ["segmentation", "classification"],
                "classifier_pooling": pooling,
                "classifier_width": width,
            },
            "preprocessing": {
                "input_size": size,
                "classifier_input": "lung_box" if lung_box else "slice",
            },
        }
    )
    return model, meta


@needs_openvino
@pytest.mark.parametrize("lung_box", [False, True], ids=["encoder_head", "lung_box_cnn8"])
def test_openvino_fp32_equals_torch_fp32(tmp_path: Path, lung_box: bool) -> None:
    model, meta = _tiny(pooling="image_cnn8" if lung_box else "max2x2_flatten", lung_box=lung_box)
    rng = np.random.default_rng(0)
    vol = rng.integers(-1100, 300, size=(5, 96, 80)).astype(np.int16)
    lung = np.zeros(vol.shape, dtype=bool)
    lung[:, 20:70, 10:60] = True
    kw: dict[str, Any] = {"device": "cpu", "precision": "fp32", "batch_size": 2}
    ref = Predictor.from_model(model, meta, **kw).predict_hu(vol, lung_mask=lung)
    p = Predictor.from_model(model, meta, engine="openvino", cache_dir=tmp_path, **kw)
    assert (p.engine, p.precision) == ("openvino", "fp32")
    got = p.predict_hu(vol, lung_mask=lung)
    _same_form(got, ref)
    assert got.lesion_probability is not None and ref.lesion_probability is not None
    np.testing.assert_allclose(got.lesion_probability, ref.lesion_probability, atol=1e-4)
    np.testing.assert_allclose(got.slice_covid_probability, ref.slice_covid_probability, atol=1e-4)


@needs_openvino
def test_node_config_auto_runs_openvino_on_the_cpu(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from dicom_node.config import load_config
    from dicom_node.worker import build_predictor

    model = {"checkpoint": str(tiny_checkpoint), "device": "cpu", "precision": "fp32"}
    cfg = load_config(None, environ={}, overrides={"model": model})
    assert cfg.model.engine == "auto"
    p = build_predictor(cfg)
    assert (p.engine, p.precision) == ("openvino", "fp32")
    cfg = load_config(None, environ={}, overrides={"model": {**model, "engine": "torch"}})
    assert build_predictor(cfg).engine == "torch"


def _same_form(got: Prediction, ref: Prediction) -> None:
    assert type(got) is type(ref)
    for name in ("lesion_probability", "slice_covid_probability"):
        a, b = getattr(got, name), getattr(ref, name)
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, name
    assert isinstance(got.series_covid_probability, float)


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ov_engine_cache")


@pytest.fixture(scope="session")
def real_series(data_dir: Path) -> dict[str, np.ndarray]:
    """Lung-PET-CT-Dx (never calibrated on): 8 of its 30 slices, with the series' lung mask."""
    from dicom_node.volume import load_series
    from mtl_model.lung import lung_mask

    vol = load_series(sorted((data_dir / NONCOVID_SERIES).glob("*.dcm")))
    lung = lung_mask(vol.hu, vol.spacing)
    idx = np.arange(9, 25, 2)
    return {"hu": vol.hu[idx], "lung": lung[idx]}


#: calibration slices for the tests' int8 builds (the product's default: 32), for CI time
TEST_CALIBRATION_SLICES = 16


@pytest.fixture(scope="session")
def int8_predictor(data_dir: Path, engine_cache: Path) -> Predictor:
    """The shipped checkpoint as int8, built once per session (about a minute)."""
    return Predictor(
        device="cpu",
        engine="openvino",
        precision="auto",
        cache_dir=engine_cache,
        calibration=calibration_source(data_dir, TEST_CALIBRATION_SLICES),
    )


@needs_openvino
@pytest.mark.slow
def test_int8_engine_decides_as_torch_on_a_real_series(
    int8_predictor: Predictor, real_series: dict[str, np.ndarray], engine_cache: Path
) -> None:
    p = int8_predictor
    assert (p.engine, p.precision) == ("openvino", "int8")
    assert p.engine_cache is not None and (p.engine_cache / MANIFEST).is_file()
    assert engine_cache in p.engine_cache.parents
    assert p.metadata.device_uid in str(p.engine_cache)
    ref_p = Predictor(device="cpu", precision="fp32", batch_size=16)
    hu, lung = real_series["hu"], real_series["lung"]
    in_lung = lung.any(axis=(1, 2))
    got = p.predict_hu(hu, in_lung, lung)
    ref = ref_p.predict_hu(hu, in_lung, lung)
    _same_form(got, ref)
    assert got.lesion_probability is not None and ref.lesion_probability is not None
    assert got.slice_covid_probability is not None and ref.slice_covid_probability is not None
    assert got.series_covid_probability is not None and ref.series_covid_probability is not None
    t = p.metadata.labels.threshold
    a, b = got.lesion_probability >= t, ref.lesion_probability >= t
    assert b.sum() > 1000  # the series has lesion-like pixels to agree on
    dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    diff = np.abs(got.lesion_probability - ref.lesion_probability)
    assert dice >= 0.97, dice
    assert float(np.quantile(diff, 0.999)) <= 0.15
    # the classifier stays floating point: the COVID figures barely move
    assert float(np.abs(got.slice_covid_probability - ref.slice_covid_probability).max()) < 1e-3
    assert abs(got.series_covid_probability - ref.series_covid_probability) < 1e-3
    assert (got.series_covid_probability >= t) == (ref.series_covid_probability >= t)


@needs_openvino
@pytest.mark.slow
def test_int8_engine_is_loaded_from_its_cache(
    int8_predictor: Predictor, engine_cache: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mtl_model.openvino_engine"):
        again = Predictor(
            device="cpu",
            engine="openvino",
            cache_dir=engine_cache,
            calibration=calibration_source(data_dir, TEST_CALIBRATION_SLICES),
        )
    assert again.engine_cache == int8_predictor.engine_cache and again.precision == "int8"
    assert "loaded from cache" in caplog.text and "built" not in caplog.text


def _corrupt(entry: Path, how: str) -> None:
    manifest = entry / MANIFEST
    if how == "weights_bytes":
        binf = next(entry.glob("*.bin"))
        data = bytearray(binf.read_bytes())
        data[len(data) // 2] ^= 0xFF
        binf.write_bytes(bytes(data))
    elif how == "xml_truncated":
        xml = next(entry.glob("*.xml"))
        xml.write_bytes(xml.read_bytes()[:100])
    elif how == "manifest_garbage":
        manifest.write_text("{not json")
    elif how == "manifest_missing":
        manifest.unlink()
    elif how == "stale_key":  # e.g. written by another OpenVINO version under this name
        data = json.loads(manifest.read_text())
        data["key"]["openvino"] = "2023.0.0"
        manifest.write_text(json.dumps(data))


CORRUPTIONS = (
    "weights_bytes",
    "xml_truncated",
    "manifest_garbage",
    "manifest_missing",
    "stale_key",
)


@needs_openvino
def test_corrupt_engine_cache_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = save_tiny_checkpoint(tiny_model(0), tmp_path / "tiny.safetensors", "0.0.0-test")
    vol = np.random.default_rng(1).integers(-1000, 200, (4, 96, 96)).astype(np.int16)
    kw: dict[str, Any] = {"device": "cpu", "engine": "openvino", "precision": "fp32"}
    first = Predictor(ckpt, cache_dir=tmp_path / "cache", **kw)
    entry = first.engine_cache
    assert entry is not None and (entry / MANIFEST).is_file()
    expected = first.predict_hu(vol)
    assert expected.lesion_probability is not None
    for how in CORRUPTIONS:
        _corrupt(entry, how)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mtl_model.openvino_engine"):
            again = Predictor(ckpt, cache_dir=tmp_path / "cache", **kw)
        assert "unusable" in caplog.text and "rebuilding" in caplog.text, (how, caplog.text)
        assert again.engine_cache == entry
        manifest = json.loads((entry / MANIFEST).read_text())  # complete and verified again
        assert manifest["key"]["openvino"] != "2023.0.0"
        got = again.predict_hu(vol)
        assert got.lesion_probability is not None
        np.testing.assert_allclose(got.lesion_probability, expected.lesion_probability, atol=1e-6)
        # no temporary folders left beside it
        assert [p.name for p in entry.parent.iterdir()] == [entry.name]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtl_model.openvino_engine"):
        Predictor(ckpt, cache_dir=tmp_path / "cache", **kw)
    assert "loaded from cache" in caplog.text and "unusable" not in caplog.text


@needs_openvino
@pytest.mark.slow
def test_corrupt_int8_cache_is_rebuilt(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = save_tiny_checkpoint(tiny_model(0), tmp_path / "tiny.safetensors", "0.0.0-test")
    source = calibration_source(data_dir, 8)
    kw: dict[str, Any] = {
        "device": "cpu",
        "engine": "openvino",
        "cache_dir": tmp_path / "c",
        "calibration": source,
    }
    first = Predictor(ckpt, **kw)
    assert first.precision == "int8" and first.engine_cache is not None
    assert first.engine_cache.name.split("-")[1] == "int8"
    _corrupt(first.engine_cache, "weights_bytes")
    with caplog.at_level(logging.WARNING, logger="mtl_model.openvino_engine"):
        second = Predictor(ckpt, **kw)
    assert "rebuilding" in caplog.text and second.precision == "int8"
    manifest = json.loads((first.engine_cache / MANIFEST).read_text())
    assert manifest["key"]["calibration"] == source.ident != calibration_source(data_dir).ident
    assert manifest["key"]["quantised"] == ["model"]
