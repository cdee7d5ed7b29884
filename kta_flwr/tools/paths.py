"""Where the developer tools find the checkout: the one repository-root helper."""

from __future__ import annotations

from pathlib import Path

#: The repository root (the Flower app: ``pyproject.toml``, ``configs/``, ``docker/``).
#: Valid in a checkout or an editable install, which is where the tools run.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Run-config presets, one TOML file per paper setting.
CONFIGS_DIR = REPO_ROOT / "configs"
#: Dockerfiles, the demo topology and its rendered compose files.
DOCKER_DIR = REPO_ROOT / "docker"
