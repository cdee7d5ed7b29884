"""``python -m kta_flwr.tools.deploy {local,compose}``: the demo topology
(``docker/federation.toml``) as local processes, or rendered as compose files.

``local`` starts the SuperLink with TLS + SuperNode authentication (creating the
credentials if there are none), registers and starts one SuperNode per partition id,
submits the app, streams its log, writes the results, and stops everything, also on
Ctrl-C. ``compose`` prints ``docker/compose.yml`` (``--write``: writes it and
``compose.gpu.yml``). See ``docs/running.md``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from kta_flwr.config import ConfigError, parse_run_config
from kta_flwr.tools.certs import make_credentials
from kta_flwr.tools.federation import LocalFederation
from kta_flwr.tools.paths import DOCKER_DIR, REPO_ROOT
from kta_flwr.tools.presets import parse_override
from kta_flwr.tools.topology import SETTINGS, load_topology, render_compose, render_gpu_override


def run_local(settings: Path, overrides: dict[str, Any], timeout: float) -> int:
    """Start the topology of ``settings`` as processes (TLS + node authentication; missing
    credentials are created), submit the app, wait for its results, stop everything.

    Returns:
        0 if the run finished and wrote its results, 1 otherwise.
    """
    topo = load_topology(settings)
    creds = topo.credentials()
    if creds.missing():
        if any(topo.certs.glob("*")):
            print(f"error: {topo.certs} lacks {[p.name for p in creds.missing()]}; "
                  "create them with python -m kta_flwr.tools.certs", file=sys.stderr)
            return 1
        make_credentials(topo.certs, len(topo.partition_ids))
        print(f"[deploy] created a CA, the SuperLink certificate and SuperNode keys in {topo.certs}")
    run_config = {**topo.run, **overrides, "min-nodes": len(topo.partition_ids),
                  "output-dir": str(topo.results), "model-dir": str(topo.models)}
    run_config["data-path"] = parse_run_config(run_config).resolved_data_path(topo.data)
    workdir = topo.results / "federation"
    workdir.mkdir(parents=True, exist_ok=True)
    before = _results_files(topo.results)
    with LocalFederation(
        workdir, len(topo.partition_ids), partition_ids=list(topo.partition_ids),
        credentials=creds, port=topo.superlink_port, supernode_ports=topo.supernode_ports(),
        num_partitions=topo.num_partitions,
    ) as fed:
        print(f"[deploy] SuperLink https://127.0.0.1:{topo.superlink_port} (TLS, node "
              f"authentication) + {len(topo.partition_ids)} SuperNodes up; logs in {fed.logs}",
              flush=True)
        proc = fed.submit(REPO_ROOT, run_config, timeout=timeout, echo=True)
    written = [path for path, stamp in _results_files(topo.results).items() if before.get(path) != stamp]
    if proc.returncode != 0 or not written:
        why = f"flwr run exit code {proc.returncode}" if proc.returncode else "no results.json was written"
        print(f"[deploy] run failed ({why}); see {workdir / 'logs'}", file=sys.stderr)
        return 1
    print(f"[deploy] results in {max(written, key=lambda p: p.stat().st_mtime_ns).parent}")
    return 0


def _results_files(results: Path) -> dict[Path, int]:
    """Every run's ``results.json`` under ``results`` and its modification time (ns): a
    new run adds one, a resumed run (``resume-from``) rewrites its own."""
    return {path: path.stat().st_mtime_ns for path in results.glob("*/results.json")}


def main(argv: list[str] | None = None) -> int:
    """``python -m kta_flwr.tools.deploy {local,compose}``."""
    parser = argparse.ArgumentParser(prog="python -m kta_flwr.tools.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="run the docker/federation.toml topology as processes")
    local.add_argument("--settings", type=Path, default=SETTINGS)
    local.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="run-config overrides on top of the settings' [run] table")
    local.add_argument("--timeout", type=float, default=3600.0, help="seconds for the run")
    compose = sub.add_parser("compose", help="render docker/compose.yml (and compose.gpu.yml)")
    compose.add_argument("--settings", type=Path, default=SETTINGS)
    compose.add_argument("--write", action="store_true",
                         help="write docker/compose.yml and docker/compose.gpu.yml instead of printing")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.command == "local":
            return run_local(args.settings, dict(parse_override(s) for s in args.set), args.timeout)
        topo = load_topology(args.settings)
        if not args.write:
            print(render_compose(topo), end="")
            return 0
        docker = DOCKER_DIR
        (docker / "compose.yml").write_text(render_compose(topo))
        (docker / "compose.gpu.yml").write_text(render_gpu_override(topo))
        print(f"wrote {docker / 'compose.yml'} and {docker / 'compose.gpu.yml'}")
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the federation was stopped on the way out
        print("[deploy] interrupted; every process stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
