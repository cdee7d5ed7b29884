"""The demo federation's settings (``docker/federation.toml``) and the compose file they render.

One file says how many SuperNodes there are, which partitions they hold, which ports and
which host folders (certificates, data, results) they use. ``docker/compose.yml`` is
rendered from it by :func:`render_compose` (``python -m kta_flwr.tools.deploy compose``), with
the same ``flower-superlink``/``flower-supernode`` command lines that
``python -m kta_flwr.tools.deploy local`` runs as plain processes
(:func:`kta_flwr.tools.federation.superlink_args`, :func:`kta_flwr.tools.federation.supernode_args`).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kta_flwr.config import ConfigError
from kta_flwr.tools.certs import Credentials
from kta_flwr.tools.federation import superlink_args, supernode_args
from kta_flwr.tools.paths import DOCKER_DIR, REPO_ROOT

SETTINGS = DOCKER_DIR / "federation.toml"
COMPOSE = DOCKER_DIR / "compose.yml"
#: Where the containers see the mounted host folders.
CERTS_MOUNT, DATA_MOUNT, RESULTS_MOUNT = "/certs", "/root/kta-flwr/data", "/results"
#: Where the SuperNode containers keep their models (the default run-config 'model-dir').
MODELS_MOUNT = "/root/kta-flwr/models"


@dataclass(frozen=True)
class Topology:  # pylint: disable=too-many-instance-attributes
    """One SuperLink and a SuperNode per partition id, on 127.0.0.1."""

    superlink_port: int
    partition_ids: tuple[int, ...]
    num_partitions: int
    first_port: int
    certs: Path  # host folders, absolute
    data: Path
    results: Path
    models: Path  # the SuperNodes' models (one partition-<id> folder each)
    run: dict[str, Any] = field(default_factory=dict)

    def supernode_ports(self) -> list[int]:
        """Port of SuperNode ``i``: ``first-port + i``."""
        return [self.first_port + i for i in range(len(self.partition_ids))]

    def credentials(self, folder: Path | None = None) -> Credentials:
        """The TLS/auth files in ``folder`` (default: the host's ``certs`` folder)."""
        return Credentials.in_dir(folder or self.certs, len(self.partition_ids))


def _get(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: missing '{key}'")
    value = table[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ConfigError(f"{where}: '{key}' = {value!r} must be a non-negative integer")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' = {value!r} must be a string")
    return value


def load_topology(path: Path = SETTINGS) -> Topology:
    """Read and check ``path``; relative folders are taken from the repository root.

    Raises:
        ConfigError: naming the bad key.
    """
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read federation settings {path}: {err}") from None
    link, nodes, paths = (raw.get(t, {}) for t in ("superlink", "supernodes", "paths"))
    ids = nodes.get("partition-ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ConfigError(f"{path} [supernodes]: 'partition-ids' = {ids!r} must be a non-empty list of partition numbers")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path} [supernodes]: 'partition-ids' = {ids} repeats a partition")
    num = _get(nodes, "num-partitions", int, f"{path} [supernodes]")
    if max(ids) >= num:
        raise ConfigError(f"{path} [supernodes]: partition {max(ids)} >= 'num-partitions' = {num}")

    def folder(key: str) -> Path:
        value = Path(_get(paths, key, str, f"{path} [paths]")).expanduser()
        return value if value.is_absolute() else REPO_ROOT / value

    return Topology(
        superlink_port=_get(link, "port", int, f"{path} [superlink]"),
        partition_ids=tuple(ids), num_partitions=num,
        first_port=_get(nodes, "first-port", int, f"{path} [supernodes]"),
        certs=folder("certs"), data=folder("data"), results=folder("results"),
        models=folder("models"),
        run=dict(raw.get("run", {})),
    )


def _relative(path: Path) -> str:
    """``path`` relative to ``docker/`` (compose resolves volumes from its own folder)."""
    try:
        return "./" + str(path.relative_to(COMPOSE.parent))
    except ValueError:
        return str(path)


def render_compose(topo: Topology) -> str:
    """``docker/compose.yml`` for ``topo``: host networking, TLS + node authentication,
    certificates and data mounted read-only, results and the nodes' models written to the
    host (so they outlive the containers)."""
    creds = topo.credentials(Path(CERTS_MOUNT))
    certs, data, results = _relative(topo.certs), _relative(topo.data), _relative(topo.results)
    models = _relative(topo.models)
    common_env = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}

    def service(image: str, build: tuple[str, str] | None, command: list[str],
                volumes: list[str], extra: list[str]) -> list[str]:
        lines = [f"    image: {image}"]
        if build is not None:  # (Dockerfile, default base image); other services reuse the image
            lines += ["    build:", "      context: ..", f"      dockerfile: docker/{build[0]}",
                      "      args:", f"        BASE_IMAGE: {build[1]}"]
        return lines + [
            "    network_mode: host",
            f"    entrypoint: {json.dumps(command[:1])}",
            f"    command: {json.dumps(command[1:])}",
            f"    environment: {json.dumps(common_env)}",
            "    volumes:",
            *[f"      - {v}" for v in volumes],
            *extra,
        ]

    lines = [
        "# Rendered from docker/federation.toml by `python -m kta_flwr.tools.deploy compose`;",
        "# edit that file and render again (tests/test_topology.py keeps them equal).",
        "# Host networking only: every connection stays on 127.0.0.1.",
        "services:",
        "  superlink:",
        *service(
            "kta-flwr-superlink:latest",
            ("superlink.Dockerfile", "${SUPERLINK_BASE_IMAGE:-flwr/serverapp:1.41.0}"),
            superlink_args(topo.superlink_port, None, creds),
            [f"{certs}:{CERTS_MOUNT}:ro", f"{data}:{DATA_MOUNT}:ro", f"{results}:{RESULTS_MOUNT}"],
            [],
        ),
    ]
    for i, (pid, port) in enumerate(zip(topo.partition_ids, topo.supernode_ports())):
        lines += [
            f"  supernode-{i}:",
            *service(
                "kta-flwr-supernode:latest",
                ("supernode.Dockerfile", "${SUPERNODE_BASE_IMAGE:-flwr/clientapp:1.41.0}")
                if i == 0 else None,
                supernode_args(topo.superlink_port, port, pid, topo.num_partitions, creds, i),
                [f"{certs}:{CERTS_MOUNT}:ro", f"{data}:{DATA_MOUNT}:ro", f"{models}:{MODELS_MOUNT}"],
                ["    depends_on: [superlink]",
                 "    restart: on-failure  # until its key is registered with the SuperLink"],
            ),
        ]
    return "\n".join(lines) + "\n"


def render_gpu_override(topo: Topology) -> str:
    """``docker/compose.gpu.yml``: every SuperNode reserves the host's GPUs (use with
    ``-f docker/compose.yml -f docker/compose.gpu.yml`` on hosts with the NVIDIA runtime)."""
    lines = ["# Rendered from docker/federation.toml by `python -m kta_flwr.tools.deploy compose`.",
             "# GPU hosts: docker-compose -f docker/compose.yml -f docker/compose.gpu.yml up",
             "services:"]
    for i in range(len(topo.partition_ids)):
        lines += [f"  supernode-{i}:", "    deploy:", "      resources:", "        reservations:",
                  "          devices:", "            - driver: nvidia", "              count: all",
                  "              capabilities: [gpu]"]
    return "\n".join(lines) + "\n"
