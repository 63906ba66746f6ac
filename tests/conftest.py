"""Shared fixtures: where the real data lives and whether its absence is fatal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """The real data folder: env CTMTL_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("CTMTL_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data; skips when absent unless CTMTL_REQUIRE_DATA=1 (as in CI)."""
    root = data_root()
    if not root.is_dir():
        if os.environ.get("CTMTL_REQUIRE_DATA") == "1":
            pytest.fail(f"CTMTL_REQUIRE_DATA=1 but the data folder {root} is missing")
        pytest.skip(f"real data not found at {root} (set CTMTL_DATA)")
    return root
