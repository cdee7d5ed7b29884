"""Fault benchmark: what a run survives, and what it costs in accuracy, against the same run
without faults.

::

    python -m kta_flwr.tools.faults --preset digits --clients 10 --seeds 0,1,2

Scenarios (``--scenarios``), each per seed through real Flower processes:

- ``none``: the fault-free run (simulation engine), the reference of the next three;
- ``dropout``: 30 % of the clients raise in each round (``fault-dropout``);
- ``straggler``: a share of the clients (``--straggler-rate``) sleep past the round
  timeout (``fault-straggler``, ``round-timeout`` = ``--straggler-timeout``);
- ``server-kill``: the whole federation (SuperLink, ServerApp, simulation) is SIGKILLed
  after round R/2 and the run resumed (``resume-from``) on a new one;
- ``node-kill``: SuperLink + ``--node-kill-clients`` SuperNodes; SuperNode 0 is SIGKILLed
  after round R/2 and restarted; against the fault-free simulation of that setting.

Writes ``<out>/faults/<preset>/faults.json`` and ``faults.md``: per scenario, what
survived (rounds completed, the run's bytes, the restarted node's round counter) and the
final accuracies against the fault-free run (paired per seed).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kta_flwr.config import DATA_ROOT, ConfigError, RunConfig
from kta_flwr.task.checkpoint import checkpoint_file, read_checkpoint
from kta_flwr.tools import cli
from kta_flwr.tools.federation import LocalFederation
from kta_flwr.tools.paths import REPO_ROOT
from kta_flwr.tools.presets import load_preset

SCENARIOS = ("none", "dropout", "straggler", "server-kill", "node-kill")
#: What each scenario injects, in words (the table's first column).
INJECTED = {
    "none": "no fault",
    "dropout": "30 % of clients raise, every round",
    "straggler": "clients sleep past the round timeout",
    "server-kill": "SuperLink + ServerApp SIGKILLed after round R/2, run resumed",
    "node-kill": "SuperNode 0 SIGKILLed after round R/2, restarted",
}


def _results(out_dir: Path) -> dict[str, Any]:
    found = sorted(out_dir.glob("*/results.json"))
    if not found:
        raise RuntimeError(f"no results in {out_dir}")
    return json.loads(found[-1].read_text())


def rounds_done(out_dir: Path) -> int:
    """Rounds completed so far by the run writing to ``out_dir`` (its rounds.csv rows)."""
    found = sorted(out_dir.glob("*/rounds.csv"))
    return len(list(csv.DictReader(found[0].open()))) if found else 0


def wait_for_rounds(out_dir: Path, rounds: int, timeout: float = 3600) -> None:
    """Block until the run writing to ``out_dir`` has completed ``rounds`` rounds.

    Raises:
        RuntimeError: not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while rounds_done(out_dir) < rounds:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{out_dir}: round {rounds} not reached in {timeout:.0f} s")
        time.sleep(0.2)


def _simulated(cfg: RunConfig, clients: int, work: Path) -> dict[str, Any]:
    with LocalFederation(work / "fed", clients, simulation=True) as fed:
        proc = fed.submit(REPO_ROOT, cfg.to_flwr(), timeout=24 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return _results(Path(cfg.output_dir))


def _server_kill(cfg: RunConfig, clients: int, work: Path) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    with LocalFederation(work / "fed-a", clients, simulation=True) as fed:
        fed.launch(REPO_ROOT, cfg.to_flwr())
        wait_for_rounds(out, cfg.num_server_rounds // 2)
        fed.kill()
    (run_dir,) = [p.parent for p in out.glob("*/server-state.json")]
    killed_after = rounds_done(out)
    with LocalFederation(work / "fed-b", clients, simulation=True) as fed:
        proc = fed.submit(REPO_ROOT, {**cfg.to_flwr(), "resume-from": str(run_dir)}, timeout=24 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"resumed run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {**_results(out), "killed_after": killed_after}


def _node_kill(cfg: RunConfig, clients: int, work: Path) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    with LocalFederation(work / "fed", clients) as fed:
        run = fed.launch(REPO_ROOT, cfg.to_flwr())
        wait_for_rounds(out, cfg.num_server_rounds // 2)
        killed_after = rounds_done(out)
        fed.kill_supernode(fed.supernode(0))
        fed.start_supernode(0)
        if run.wait(timeout=24 * 3600) != 0:
            raise RuntimeError(f"run failed; see {fed.logs / 'run.log'}")
    meta = read_checkpoint(checkpoint_file(Path(cfg.model_dir) / "partition-0", cfg.strategy)).meta
    return {**_results(out), "killed_after": killed_after,
            "node0_rounds_trained": meta.rounds_trained, "node0_round": meta.round}


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    s = res["summary"]
    out = {
        "personalized": s["final_personalized_accuracy"], "global": s["final_global_accuracy"],
        "bytes_total": s["bytes_total"], "failed": s.get("failed", 0),
        "rounds": s["rounds_completed"], "planned": res["config"]["num-server-rounds"],
        "seconds": s["seconds"],
    }
    return {**out, **{k: res[k] for k in ("killed_after", "node0_rounds_trained", "node0_round") if k in res}}


def run_faults(  # pylint: disable=too-many-arguments,too-many-locals
    preset: str, clients: int, seeds: list[int], out_dir: Path, overrides: dict[str, Any],
    scenarios: list[str], data_root: Path | None, *, straggler_rate: float = 0.1,
    straggler_timeout: float = 30.0, node_kill_clients: int = 3,
    node_kill_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every (scenario, seed); write faults.json and faults.md; return the report."""
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise ConfigError(f"--scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")
    base = load_preset(preset, {"min-nodes": clients, **overrides})
    base = base.rooted(data_root or DATA_ROOT)
    kill_base = base.replace(min_nodes=node_kill_clients,
                             **{k.replace("-", "_"): v for k, v in (node_kill_overrides or {}).items()})
    results_dir = out_dir / "faults" / preset
    report_file = results_dir / "faults.json"
    report: dict[str, Any] = json.loads(report_file.read_text()) if report_file.is_file() else {}
    report.setdefault("runs", {})
    plan = {
        "none": (base, clients, _simulated),
        "dropout": (base.replace(fault_dropout=0.3), clients, _simulated),
        "straggler": (base.replace(fault_straggler=straggler_rate, round_timeout=straggler_timeout),
                      clients, _simulated),
        "server-kill": (base, clients, _server_kill),
        "node-kill": (kill_base.replace(round_timeout=90.0), node_kill_clients, _node_kill),
        "node-kill/none": (kill_base, node_kill_clients, _simulated),
    }
    todo = [s for s in plan if s.split("/")[0] in scenarios]
    for seed in seeds:
        for scenario in todo:
            key = f"{scenario}/seed{seed}"
            if key in report["runs"]:
                print(f"[faults] {key}: done before, kept", flush=True)
                continue
            cfg, nodes, runner = plan[scenario]
            with tempfile.TemporaryDirectory(prefix="kta-faults-") as tmp:
                work = Path(tmp)
                cfg = cfg.replace(seed=seed, output_dir=str(work / "out"), model_dir=str(work / "models"))
                print(f"[faults] {preset} {key} ...", flush=True)
                started = time.monotonic()
                row = _summary(runner(cfg, nodes, work))
            row["wall"] = round(time.monotonic() - started, 1)
            report["runs"][key] = row
            print(f"[faults] {key}: {row}", flush=True)
            results_dir.mkdir(parents=True, exist_ok=True)
            report_file.write_text(json.dumps(report, indent=2))
    every_seed = sorted({*report.get("seeds", []), *seeds})
    report.update(preset=preset, clients=clients, seeds=every_seed, node_kill_clients=node_kill_clients,
                  config=base.to_flwr(), straggler_rate=straggler_rate,
                  straggler_timeout=straggler_timeout)
    results_dir.mkdir(parents=True, exist_ok=True)
    report_file.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (results_dir / "faults.md").write_text(table)
    print(table)
    return report


def _paired(runs: dict[str, Any], scenario: str, reference: str, seeds: list[int], key: str) -> str:
    diffs = [runs[f"{scenario}/seed{s}"][key] - runs[f"{reference}/seed{s}"][key]
             for s in seeds if f"{scenario}/seed{s}" in runs and f"{reference}/seed{s}" in runs]
    if not diffs:
        return "—"
    return f"{100 * statistics.fmean(diffs):+.2f} pt ({', '.join(f'{100 * d:+.1f}' for d in diffs)})"


def markdown(report: dict[str, Any]) -> str:
    """The table of faults.md."""
    runs, seeds = report["runs"], report["seeds"]
    lines = [
        f"Fault benchmark, preset `{report['preset']}`, {report['clients']} clients "
        f"(node-kill: {report['node_kill_clients']} SuperNodes), seeds {seeds}.",
        "",
        "| scenario | injected | what survived | personalized (mean) | vs fault-free, paired | "
        "failed messages | MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario in SCENARIOS:
        mine = [runs[f"{scenario}/seed{s}"] for s in seeds if f"{scenario}/seed{s}" in runs]
        if not mine:
            continue
        reference = "node-kill/none" if scenario == "node-kill" else "none"
        survived = f"{min(r['rounds'] for r in mine)} of {mine[0]['planned']} rounds"
        if "killed_after" in mine[0]:
            survived += f"; killed after round {[r['killed_after'] for r in mine]}"
        if scenario == "server-kill":
            same = [runs.get(f"none/seed{s}", {}).get("bytes_total") == runs[f"server-kill/seed{s}"]["bytes_total"]
                    for s in seeds if f"server-kill/seed{s}" in runs]
            survived += f"; bytes equal to fault-free in {sum(same)}/{len(same)}"
        if scenario == "node-kill":
            survived += f"; node 0 trained {[r['node0_rounds_trained'] for r in mine]} rounds in all"
        lines.append(
            f"| {scenario} ({len(mine)} seed{'s' if len(mine) > 1 else ''}) | {INJECTED[scenario]} | {survived} | "
            f"{statistics.fmean(r['personalized'] for r in mine):.4f} | "
            f"{'—' if scenario == 'none' else _paired(runs, scenario, reference, seeds, 'personalized')} | "
            f"{statistics.fmean(r['failed'] for r in mine):.1f} | "
            f"{statistics.fmean(r['bytes_total'] for r in mine) / 2**20:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = cli.benchmark_parser("python -m kta_flwr.tools.faults", __doc__,
                                  "run-config overrides on top of the preset")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--straggler-rate", type=float, default=0.1)
    parser.add_argument("--straggler-timeout", type=float, default=30.0,
                        help="round-timeout of the straggler runs (s)")
    parser.add_argument("--node-kill-clients", type=int, default=3)
    parser.add_argument("--node-kill-set", nargs="*", default=["num-server-rounds=5"],
                        metavar="KEY=VALUE", help="run-config overrides of the node-kill runs")
    return cli.run_benchmark_cli(parser, argv, lambda args, data_root: run_faults(
        args.preset, args.clients, [int(s) for s in args.seeds.split(",")], args.out,
        cli.overrides(args.set), [s.strip() for s in args.scenarios.split(",") if s.strip()],
        data_root, straggler_rate=args.straggler_rate, straggler_timeout=args.straggler_timeout,
        node_kill_clients=args.node_kill_clients, node_kill_overrides=cli.overrides(args.node_kill_set),
    ))


if __name__ == "__main__":
    sys.exit(main())
