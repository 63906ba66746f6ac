"""Experiment configs: every shipped file parses; bad files fail with a clear message."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mtl_model.checkpoint import default_checkpoint_path, read_metadata
from training.config import ConfigError, dump_toml, load_config, parse_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config" / "train"
EXPECTED = {
    "mtl_t123_256",
    "mtl_t12_256",
    "mtl_t13_256",
    "mtl_t23_256",
    "mtl_t123_512",
    "unet_256",
    "unet_512",
    "cnn8_256",
    "release_cpu",
}


def test_all_experiment_configs_parse() -> None:
    files = {p.stem: p for p in CONFIG_DIR.glob("*.toml")}
    assert set(files) >= EXPECTED
    for path in files.values():
        cfg = load_config(path)
        assert cfg.data.train and cfg.data.val
    paper = load_config(files["mtl_t123_256"])
    assert paper.model.tasks == ["reconstruction", "segmentation", "classification"]
    assert (paper.model.base_width, paper.model.input_size) == (64, 256)
    assert (paper.train.lr, paper.train.batch_size, paper.train.patience) == (1e-4, 4, 35)
    assert load_config(files["mtl_t23_256"]).model.tasks == ["segmentation", "classification"]
    assert load_config(files["mtl_t123_512"]).model.input_size == 512
    assert load_config(files["unet_256"]).model.architecture == "unet"
    assert load_config(files["cnn8_256"]).model.tasks == ["classification"]


def test_medseg_split_and_class_labels_in_configs() -> None:
    for path in CONFIG_DIR.glob("*.toml"):
        cfg = load_config(path)
        for spec in [*cfg.data.train, *cfg.data.val]:
            if spec.kind == "medseg_png":
                assert (spec.val_every, spec.val_offset) == (5, 0), path.name
        real_non_covid = any(
            s.kind in ("png_stack", "dicom_seg") and s.covid_label is False for s in cfg.data.train
        )
        if "classification" in cfg.model.tasks and not real_non_covid:
            # all-COVID MedSeg labels without real non-COVID CT beside them would teach
            # the classifier "real CT look = COVID"
            assert all(not s.use_class_label for s in cfg.data.train if s.kind == "medseg_png"), (
                path.name
            )


def test_configs_that_fine_tune_the_release_describe_its_network() -> None:
    """init_from the shipped checkpoint only works with the network it holds."""
    meta = read_metadata(default_checkpoint_path())
    arch = meta.architecture
    users = []
    for path in CONFIG_DIR.glob("*.toml"):
        cfg = load_config(path)
        if cfg.train.init_from == "mtl_model/weights/ctmtl-release.safetensors":
            users.append(path.stem)
            m = cfg.model
            if m.architecture == "cnn8":  # the release's 8-layer CNN classifier alone
                assert arch.classifier_pooling == "image_cnn8", path.name
                assert (m.base_width, m.input_size) == (arch.classifier_width, arch.input_size)
            else:
                got = (m.architecture, m.base_width, m.input_size, m.classifier_pooling)
                want = (arch.name, arch.base_width, arch.input_size, arch.classifier_pooling)
                assert got == want, path.name
                assert m.classifier_width == arch.classifier_width, path.name
            # the exported fine-tune must tell the node what the classifier sees
            assert m.classifier_input == meta.preprocessing.classifier_input, path.name
    assert {"finetune_corrected", "release_finetune_seg", "cnn8_release_swa_cpu"} <= set(users)


def test_dump_toml_round_trips() -> None:
    cfg = load_config(CONFIG_DIR / "release_cpu.toml")
    again = parse_config(tomllib.loads(dump_toml(cfg)))
    assert again == cfg


def test_bad_configs_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\n[model]\ntasks = ["segmentation", "colouring"]\n'
        '[[data.train]]\nkind = "covid_ct"\npath = "p"\n[train]\nlr = -1\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert "bad.toml" in msg and "model.tasks" in msg and "train.lr" in msg
    with pytest.raises(ConfigError, match="not valid TOML"):
        bad.write_text("name = ")
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="classifier_pooling applies"):
        parse_config(
            {
                "name": "c",
                "model": {
                    "architecture": "cnn8",
                    "tasks": ["classification"],
                    "classifier_pooling": "global_average",
                },
                "data": {"train": [{"kind": "covid_ct", "path": "c"}]},
            }
        )
    with pytest.raises(ConfigError, match="freeze names a module twice"):
        parse_config(
            {
                "name": "f",
                "data": {"train": [{"kind": "covid_ct", "path": "c"}]},
                "train": {"freeze": ["encoder", "encoder"]},
            }
        )
    with pytest.raises(ConfigError, match="unet"):
        parse_config(
            {
                "name": "u",
                "model": {"architecture": "unet", "tasks": ["classification"]},
                "data": {"train": [{"kind": "medseg_png", "path": "m"}]},
            }
        )
