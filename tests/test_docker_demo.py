"""Opt-in (`pytest -m docker`): rerun the docker-compose demo, 1 SuperLink + 3 SuperNodes in
containers with TLS and node authentication, and a short kta run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kta_flwr.tools.topology import COMPOSE

# slow too: it starts Flower processes (in containers), so the fast tier (-m "not slow",
# which replaces the default -m "not docker") leaves it out as well
pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _skip_unless_ready() -> None:
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        pytest.skip("docker and docker-compose are needed for the compose demo")
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no Docker engine is reachable (start dockerd; see the README's docker-compose demo)")
    for image in ("kta-flwr-superlink:latest", "kta-flwr-supernode:latest"):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                          check=False).returncode != 0:
            pytest.skip(f"image {image} is not built (docker-compose -f docker/compose.yml build)")


def test_compose_demo_runs_kta():
    _skip_unless_ready()
    # demo.sh calls python3 and flwr: this interpreter's, installed with the project
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    proc = subprocess.run(
        [str(COMPOSE.parent / "demo.sh"), "num-server-rounds=2"],
        capture_output=True, text=True, timeout=900, check=False, env={**os.environ, "PATH": path},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "kta finished: personalized" in out and "demo: results in" in out
