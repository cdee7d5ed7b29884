"""Cross-device benchmark: kta and FedAvg from 10 to 1,000 simulated clients.

::

    python -m kta_flwr.tools.cross_device --preset emnist_letters \\
        --fleet 10,100,300,1000 --strategies kta,fedavg

Each fleet size runs through the real Flower app (the simulation engine unless
``--engine deployment``; a fresh SuperLink per run) on the preset with ``models=mlp`` and ``num-server-rounds=5``; fleets above
``--full-participation`` clients (default 100) sample ``fraction-train`` and
``fraction-evaluate`` 0.1, and clients evaluate in the last round only. Per run it reports:

- seconds per round (mean of rounds 2..R; round 1 also starts Ray and loads data), split
  into the clients' compute (their phases, summed over clients), the server's market, and
  the rest: Flower/Ray messaging, serialization, scheduling and idle cores, also per
  message (one sampled client's train or evaluate round trip);
- peak memory: the ServerApp process (its own ``ru_maxrss``) and the whole simulation
  (the SuperLink and every process under it, sampled every 0.5 s);
- final personalized and global accuracy of the evaluated clients, and MiB exchanged.

Writes ``<out>/cross_device/<preset>/cross_device.json``, ``cross_device.md`` and
``cost_vs_clients.png`` (log-log: each part of the round against the fleet size).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kta_flwr.config import DATA_ROOT
from kta_flwr.tools import cli
from kta_flwr.tools.efficiency import hardware, run_flower, scaling_point
from kta_flwr.tools.plots import figure, save_figure
from kta_flwr.tools.presets import load_preset

SAMPLED_FRACTION = 0.1


def point(flower: dict[str, Any], strategy: str, clients: int, fraction: float) -> dict[str, Any]:
    """One row of the table from a finished run."""
    rows, summary = flower["results"]["rounds"], flower["results"]["summary"]
    times = scaling_point(flower, clients)  # round and client seconds of rounds 2..R
    later = rows[1:] or rows
    market = statistics.fmean(r.get("market_seconds", 0.0) for r in later)
    messages = statistics.fmean(r["messages"] for r in later)
    rest = times["round_seconds"] - times["client_seconds_per_round"] - market
    last = rows[-1]
    return {
        "strategy": strategy, "clients": clients, "fraction": fraction,
        "messages_per_round": round(messages),
        "first_round_seconds": times["first_round_seconds"],
        "round_seconds": times["round_seconds"],
        "client_seconds_per_round": times["client_seconds_per_round"],
        "market_seconds_per_round": market,
        "rest_seconds_per_round": rest,
        "rest_ms_per_message": 1000 * rest / max(1.0, messages),
        "server_peak_rss_mib": summary.get("server_peak_rss_mib", float("nan")),
        "simulation_peak_rss_mib": flower["federation_peak_rss_mib"],
        "personalized_accuracy": summary["final_personalized_accuracy"],
        "global_accuracy": summary["final_global_accuracy"],
        "clients_evaluated": last["clients_evaluated"],
        "mib_total": summary["mib_total"],
        "wall_seconds": flower["wall_seconds"],
        "results_json": flower["results_json"],
    }


def markdown(report: dict[str, Any]) -> str:
    """The table."""
    lines = [
        f"Preset `{report['preset']}` ({report['overrides']}), {report['engine']} engine, "
        f"{report['hardware']}, {report['date']}.",
        "",
        "| strategy | clients | messages / round | s / round | clients s | market s | rest s "
        "| rest ms / message | ServerApp peak MiB | simulation peak MiB | pers. acc | global acc "
        "| evaluated | MiB total | round 1 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['strategy']} | {p['clients']:,} | {p['messages_per_round']} | {p['round_seconds']:.2f} "
        f"| {p['client_seconds_per_round']:.2f} | {p['market_seconds_per_round']:.3f} "
        f"| {p['rest_seconds_per_round']:.2f} | {p['rest_ms_per_message']:.1f} "
        f"| {p['server_peak_rss_mib']:,.0f} | {p['simulation_peak_rss_mib']:,.0f} "
        f"| {p['personalized_accuracy']:.4f} | {p['global_accuracy']:.4f} "
        f"| {p['clients_evaluated']} | {p['mib_total']:,.1f} | {p['first_round_seconds']:.1f} |"
        for p in report["points"]
    ]
    return "\n".join(lines) + "\n"


def plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    """Log-log: round, client, market and rest seconds against the fleet size, per strategy."""
    fig, ax = figure((7, 4.5))
    parts = (("round_seconds", "round", "-"), ("client_seconds_per_round", "clients", "--"),
             ("rest_seconds_per_round", "Flower/Ray rest", ":"),
             ("market_seconds_per_round", "market", "-."))
    for strategy, marker in (("kta", "o"), ("fedavg", "s")):
        mine = [p for p in points if p["strategy"] == strategy]
        if not mine:
            continue
        for key, label, style in parts:
            values = [(p["clients"], p[key]) for p in mine if p[key] > 0]
            if values:
                ax.plot(*zip(*values), marker=marker, linestyle=style, label=f"{strategy}: {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients in the fleet (simulated SuperNodes)")
    ax.set_ylabel("seconds per round")
    ax.set_title(title, fontsize=9)
    save_figure(fig, ax, path)


def run_cross_device(  # pylint: disable=too-many-arguments
    preset: str, fleet: list[int], strategies: list[str], out_dir: Path,
    overrides: dict[str, Any] | None = None, data_root: Path | None = None,
    full_participation: int = 100, engine: str = "simulation",
) -> dict[str, Any]:
    """Every (strategy, fleet size) run; writes the report files after each run."""
    base = {"models": "mlp", "num-server-rounds": 5, **(overrides or {})}
    rounds = int(base["num-server-rounds"])
    name = Path(preset).stem
    results_dir = out_dir / "cross_device" / name
    results_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "preset": name, "overrides": " ".join(f"{k}={v}" for k, v in base.items()),
        "engine": engine, "hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "points": [],
    }
    for clients in fleet:
        fraction = 1.0 if clients <= full_participation else SAMPLED_FRACTION
        for strategy in strategies:
            cfg = load_preset(preset, {
                **base, "strategy": strategy, "min-nodes": clients, "evaluate-every": rounds,
                "fraction-train": fraction, "fraction-evaluate": fraction,
            })
            cfg = cfg.rooted(data_root or DATA_ROOT)
            print(f"[cross-device] {strategy}, {clients} clients, fraction {fraction} ...", flush=True)
            row = point(run_flower(cfg, clients, engine, results_dir), strategy, clients, fraction)
            report["points"].append(row)
            print(f"[cross-device] {strategy} {clients}: {row['round_seconds']:.2f} s/round, "
                  f"rest {row['rest_ms_per_message']:.1f} ms/message, "
                  f"pers-acc {row['personalized_accuracy']:.4f}", flush=True)
            (results_dir / "cross_device.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report["points"], results_dir / "cost_vs_clients.png",
         f"Cost per round vs fleet size: {name}, {report['overrides']}\n"
         f"(fleets above {full_participation} clients sample {SAMPLED_FRACTION:.0%} per round)")
    table = markdown(report)
    (results_dir / "cross_device.md").write_text(table)
    print(table)
    print(f"[cross-device] wrote {results_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = cli.benchmark_parser("python -m kta_flwr.tools.cross_device", __doc__,
                                  "run-config overrides for every run")
    parser.add_argument("--fleet", default="10,100,300,1000", help="fleet sizes")
    parser.add_argument("--strategies", default="kta,fedavg")
    parser.add_argument("--full-participation", type=int, default=100,
                        help="largest fleet where every client trains each round")
    return cli.run_benchmark_cli(parser, argv, lambda args, data_root: run_cross_device(
        args.preset, [int(n) for n in args.fleet.split(",") if n.strip()],
        [s.strip() for s in args.strategies.split(",") if s.strip()], args.out,
        cli.overrides(args.set), data_root, args.full_participation, args.engine,
    ))


if __name__ == "__main__":
    sys.exit(main())
