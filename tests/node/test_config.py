"""Config: the example validates, env overrides apply, mistakes name their key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dicom_node.config import (
    ConfigError,
    effective_toml,
    env_overrides,
    load_config,
    validate_ae_title,
)
from helpers import REPO

EXAMPLE = REPO / "config" / "node.toml"


def test_example_config_validates_and_resolves_paths() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.node.ae_title == "CTMTL"
    assert cfg.spool.path == (REPO / "var" / "spool").resolve()
    assert cfg.database_url == f"sqlite:///{REPO / 'var' / 'spool' / 'ctmtl-node.db'}"
    assert cfg.model.checkpoint is None  # the shipped one
    assert cfg.model.batch_size is None  # the predictor's: 2 on a CPU, 16 on a GPU
    dests, problems = cfg.route("ORTHANC")
    assert [d.name for d in dests] == ["pacs"] and not problems
    dests, _ = cfg.route("STORESCU")
    assert [d.name for d in dests] == ["workstation"]
    assert cfg.caller_allowed("STORESCU", "127.0.0.1")
    assert not cfg.caller_allowed("STORESCU", "10.1.2.3")
    assert not cfg.caller_allowed("EVIL", "127.0.0.1")


def test_effective_config_is_valid_toml_that_round_trips(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, environ={})
    text = effective_toml(cfg)
    data = tomllib.loads(text)
    assert data["node"]["port"] == 11112
    again = tmp_path / "again.toml"
    again.write_text(text)
    cfg2 = load_config(again, environ={})
    assert cfg2.database_url == cfg.database_url
    cfg.database.url = cfg2.database.url  # made explicit by the effective view
    assert cfg2.model_dump() == cfg.model_dump()


def test_env_overrides_take_precedence(tmp_path: Path) -> None:
    env = {
        "CTMTL_NODE__PORT": "11999",
        "CTMTL_NODE__AE_TITLE": "OTHERNODE",
        "CTMTL_DATABASE__URL": "sqlite:///db/x.db",
        "CTMTL_SELECTION__MODALITIES": '["CT", "PT"]',
        "CTMTL_DATA": "/not/a/config/key",  # no "__": ignored
    }
    assert env_overrides(env)["node"] == {"port": 11999, "ae_title": "OTHERNODE"}
    cfg = load_config(EXAMPLE, environ=env)
    assert cfg.node.port == 11999
    assert cfg.node.ae_title == "OTHERNODE"
    assert cfg.selection.modalities == ["CT", "PT"]
    # relative SQLite paths resolve against the config file's folder
    assert cfg.database_url == f"sqlite:///{(EXAMPLE.parent / 'db' / 'x.db').resolve()}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("    ", "all spaces"),
        ("A" * 17, "longer than 16"),
        ("BAD\\AE", "backslash"),
        ("BAD\nAE", "control"),
    ],
)
def test_ae_title_rules(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_ae_title(value)


def test_ae_title_spaces_are_trimmed() -> None:
    assert validate_ae_title("  CTMTL ") == "CTMTL"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "node.ae_title", "16"),
        ("[node]\nport = 70000\n", "node.port", "65535"),
        ("[node]\nprot = 1\n", "node.prot", "Extra inputs"),
        (
            '[[destinations]]\nname = "pacs"\nae_title = "P"\nhost = "h"\n',
            "destinations.0.port",
            "required",
        ),
        ('[routing]\ndefault = ["nowhere"]\n', "(top level)", "unknown destination"),
        (
            "[selection]\nmin_slice_thickness_mm = 5\nmax_slice_thickness_mm = 1\n",
            "selection",
            "larger",
        ),
        (
            '[selection]\nbody_part_patterns = ["(unclosed"]\n',
            "selection.body_part_patterns",
            "regular expression",
        ),
        ('[model]\ndevice = "tpu"\n', "model.device", "pattern"),
        ("[model]\nbatch_size = 0\n", "model.batch_size", "greater than or equal to 1"),
        ('[results]\nempty_frames = "sometimes"\n', "results.empty_frames", "keep"),
    ],
)
def test_each_mistake_names_its_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    keys = [k for k, _ in info.value.errors]
    assert any(k.startswith(key) for k in keys), info.value.errors
    assert fragment in str(info.value)


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="syntax"):
        load_config(_write(tmp_path, "[node\n"), environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_duplicate_destination_names(tmp_path: Path) -> None:
    text = (
        '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
        '[[destinations]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 2\n'
    )
    with pytest.raises(ConfigError, match="not unique"):
        load_config(_write(tmp_path, text), environ={})


def test_route_to_sender_without_destination_reports_problem() -> None:
    cfg = load_config(EXAMPLE, environ={})
    dests, problems = cfg.route("UNKNOWN")
    assert dests == []
    assert "no destination configured for calling AE 'UNKNOWN'" in problems[0]
