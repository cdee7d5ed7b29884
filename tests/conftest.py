"""Shared fixtures: the app directory and a results reader."""

import json
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
