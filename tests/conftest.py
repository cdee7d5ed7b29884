"""Shared fixtures: the app directory and a results reader."""

import json
import os
from pathlib import Path

import pytest

APP_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture
def app_dir() -> Path:
    """The Flower app (repository root)."""
    return APP_DIR


def read_results(output_dir: Path) -> list[dict]:
    """All ``results.json`` under ``output_dir``, oldest first."""
    return [json.loads(p.read_text()) for p in sorted(output_dir.glob("*/results.json"))]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` (or ``$KTA_DATASETS``): real data for loader tests.

    Skips when absent; with ``KTA_REQUIRE_DATASETS=1`` (set by ``.ci/run``) it fails instead.
    """
    path = Path(os.environ.get("KTA_DATASETS", APP_DIR.parent / "shared" / "datasets"))
    if not path.is_dir():
        reason = f"real datasets not found at {path} (set KTA_DATASETS to their folder)"
        if os.environ.get("KTA_REQUIRE_DATASETS") == "1":
            pytest.fail(reason + "; KTA_REQUIRE_DATASETS=1 makes them mandatory")
        pytest.skip(reason)
    return path.resolve()
