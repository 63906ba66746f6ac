"""`ctmtl-node config check`: the example validates; each kind of mistake gives its
message (with the key path) and its exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dicom_node.cli import main
from helpers import REPO
from ops.conftest import write_toml

EXAMPLE = REPO / "config" / "node.toml"


def check(path: Path, capsys: pytest.CaptureFixture[str], **env: str) -> tuple[int, str, str]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        code = main(["config", "check", str(path)])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = capsys.readouterr()
    return code, out.out, out.err


def test_example_config_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(EXAMPLE, capsys)
    assert code == 0, err
    assert "valid" in out.splitlines()[0]
    assert "[node]" in out and 'ae_title = "CTMTL"' in out
    assert "[[destinations]]" in out


def test_entry_point_exit_codes(tmp_path: Path) -> None:
    """The installed console script, as systemd's ExecStartPre runs it."""
    exe = Path(sys.executable).with_name("ctmtl-node")
    if not exe.exists():
        pytest.skip("ctmtl-node console script not installed in this environment")
    good = subprocess.run(
        [str(exe), "config", "check", str(EXAMPLE)], capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n')
    res = subprocess.run([str(exe), "config", "check", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "node.ae_title" in res.stderr and "longer than 16" in res.stderr


def base(tmp_path: Path) -> dict[str, Any]:
    return {
        "node": {"ae_title": "CTMTL", "port": 11112},
        "spool": {"path": str(tmp_path / "spool")},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
    }


MISTAKES: list[tuple[str, dict[str, Any], str, str]] = [
    ("ae title too long", {"node": {"ae_title": "A" * 17}}, "node.ae_title", "longer than 16"),
    ("ae title backslash", {"node": {"ae_title": "A\\B"}}, "node.ae_title", "backslash"),
    ("ae title empty", {"node": {"ae_title": "  "}}, "node.ae_title", "empty"),
    ("port out of range", {"node": {"port": 70000}}, "node.port", "less than or equal to 65535"),
    ("unknown key", {"node": {"colour": "red"}}, "node.colour", "Extra inputs"),
    ("wrong type", {"completion": {"idle_seconds": "soon"}}, "completion.idle_seconds", "number"),
    (
        "destination port",
        {"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 0}]},
        "destinations.0.port",
        "greater than or equal to 1",
    ),
    (
        "destination ae title",
        {
            "destinations": [
                {"name": "p", "ae_title": "TOO_LONG_AE_TITLE_X", "host": "h", "port": 1}
            ]
        },
        "destinations.0.ae_title",
        "longer than 16",
    ),
    (
        "duplicate destination",
        {
            "destinations": [
                {"name": "p", "ae_title": "P", "host": "h", "port": 1},
                {"name": "p", "ae_title": "Q", "host": "h", "port": 2},
            ]
        },
        "(top level)",
        "not unique",
    ),
    (
        "unknown routing target",
        {"routing": {"default": ["nowhere"]}},
        "(top level)",
        "unknown destination",
    ),
    (
        "tls without ca",
        {
            "destinations": [
                {"name": "p", "ae_title": "P", "host": "h", "port": 1, "tls": {"enabled": True}}
            ]
        },
        "destinations.0.tls",
        "needs ca_file",
    ),
    (
        "inbound tls without certificate",
        {"node": {"tls": {"enabled": True, "ca_file": "ca.pem"}}},
        "node.tls",
        "needs cert_file and key_file",
    ),
    (
        "caller requires tls, node has none",
        {"allowed_callers": [{"ae_title": "PACS", "require_tls": True}]},
        "(top level)",
        "require TLS but node.tls is off",
    ),
    (
        "bad selection regex",
        {"selection": {"body_part_patterns": ["(chest"]}},
        "selection.body_part_patterns",
        "bad regular expression",
    ),
    ("bad device", {"model": {"device": "tpu"}}, "model.device", "pattern"),
]


@pytest.mark.parametrize(
    ("change", "key", "message"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_each_mistake_has_its_message(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    key: str,
    message: str,
) -> None:
    data = base(tmp_path)
    for section, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    path = write_toml(tmp_path / "node.toml", data)
    code, out, err = check(path, capsys)
    assert code == 2, out
    assert out == ""
    lines = [line.strip() for line in err.splitlines()]
    assert any(line.startswith(f"{key}:") and message in line for line in lines), err


def test_every_error_is_listed_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = base(tmp_path)
    data["node"] = {"ae_title": "A" * 20, "port": -1}
    data["worker"] = {"max_attempts": 0}
    code, _, err = check(write_toml(tmp_path / "n.toml", data), capsys)
    assert code == 2
    assert "3 error(s)" in err
    for key in ("node.ae_title", "node.port", "worker.max_attempts"):
        assert f"  {key}:" in err


def test_missing_file_and_syntax_error_have_own_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = check(tmp_path / "absent.toml", capsys)
    assert code == 3 and "file not found" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\nae_title = 'X'\n")
    code, _, err = check(broken, capsys)
    assert code == 4 and "(syntax)" in err


def test_files_the_config_names_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = base(tmp_path)
    data["destinations"][0]["tls"] = {"enabled": True, "ca_file": "certs/ca.pem"}
    data["model"] = {"checkpoint": "models/none.safetensors"}
    code, _, err = check(write_toml(tmp_path / "node.toml", data), capsys)
    assert code == 2
    assert (
        f"destinations.0.tls: pacs: TLS file {tmp_path / 'certs' / 'ca.pem'} does not exist" in err
    )
    assert "model.checkpoint: file" in err and "does not exist" in err


def test_environment_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_toml(tmp_path / "node.toml", base(tmp_path))
    url = "postgresql+psycopg2://db/x"  # no server "db" here: a warning, not an error
    code, out, err = check(path, capsys, CTMTL_NODE__PORT="11999", CTMTL_DATABASE__URL=url)
    assert code == 0, err
    assert "port = 11999" in out and f'url = "{url}"' in out
    code, out, err = check(path, capsys, CTMTL_NODE__PORT="many")
    assert code == 2 and "node.port:" in err
    code, _, err = check(path, capsys, CTMTL_NODE__AE_TITLE="X" * 17)
    assert code == 2 and "node.ae_title:" in err


def test_other_commands_refuse_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 'x'\n")
    for argv in (
        ["status", "--config", str(bad)],
        ["destinations", "--config", str(bad)],
        ["db", "upgrade", "--config", str(bad)],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "node.port" in capsys.readouterr().err
