"""Accuracy against ε: every method with DP-SGD clients at several target ε, through
the benchmark harness (:mod:`kta_flwr.tools.bench`).

::

    python -m kta_flwr.tools.privacy_bench --preset digits --clients 10 --seeds 0,1,2 \\
        --epsilons 1,3,8,inf --methods kta,fedavg,local --out results/privacy

runs each method at each ε (``<method>:dp-epsilon=<ε>``; ``inf``: DP off) and seed, writes
bench's ``summary.json``/``summary.md``/``accuracy_vs_mib.png`` and, in
``<out>/<preset>/``:

- ``privacy.json`` and ``privacy.md``: per method and ε, the mean ± std over seeds of the
  final personalized and global accuracy, the ε the clients reported (the largest over
  clients, the mean over seeds) and the MiB;
- ``accuracy_vs_epsilon.png``: accuracy against ε, one line per method (personalized
  solid, global dashed), "no DP" on the right.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from kta_flwr.config import ConfigError
from kta_flwr.tools import cli
from kta_flwr.tools.bench import RunResult, aggregate, run_bench, slug
from kta_flwr.tools.plots import colours, figure, save_figure


def parse_epsilons(text: str) -> list[float]:
    """``"1,3,8,inf"`` -> ``[1.0, 3.0, 8.0, inf]`` (positive; ``inf``: DP off).

    Raises:
        ConfigError: a value that is not a positive number or ``inf``.
    """
    values = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not value > 0:
            raise ConfigError(f"--epsilons: {item!r} is not a positive number or 'inf'")
        values.append(value)
    if not values:
        raise ConfigError("--epsilons is empty; e.g. 1,3,8,inf")
    return values


def variant(method: str, epsilon: float) -> str:
    """The bench method of ``method`` at ``epsilon``: ``kta:dp-epsilon=3`` (``inf``: ``kta``)."""
    return method if math.isinf(epsilon) else f"{method}:dp-epsilon={epsilon:g}"


def reported_epsilon(run_dir: Path) -> float:
    """The largest ε any client reported in the run under ``run_dir`` (nan without DP)."""
    found = sorted(run_dir.glob("*/results.json"))
    if not found:
        return math.nan
    spent = json.loads(found[-1].read_text())["summary"].get("dp_epsilon", {})
    return max(spent.values()) if spent else math.nan


def privacy_table(
    methods: list[str], epsilons: list[float], runs: list[RunResult], runs_dir: Path
) -> dict[str, dict[str, Any]]:
    """``{method: {ε as text: stats}}``: bench's per-variant statistics plus ``epsilon_spent``
    (mean over seeds of the largest ε a client reported)."""
    stats = aggregate(runs, 1.0)
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        for epsilon in epsilons:
            name = variant(method, epsilon)
            if name not in stats:
                continue
            spent = [reported_epsilon(runs_dir / f"{slug(name)}-seed{seed}") for seed in stats[name]["seeds"]]
            finite = [s for s in spent if not math.isnan(s)]
            table.setdefault(method, {})[f"{epsilon:g}"] = {
                **stats[name], "epsilon_spent": sum(finite) / len(finite) if finite else math.inf,
            }
    return table


def markdown(preset: str, table: dict[str, dict[str, Any]]) -> str:
    """The table: a row per method and ε."""
    lines = [f"## {preset}: accuracy against ε (DP-SGD on every client)", "",
             "| method | target ε | ε reported (max over clients) | personalized | global | MiB | seeds |",
             "|---|---|---|---|---|---|---|"]
    for method, row in table.items():
        for epsilon, s in row.items():
            spent = "no DP" if math.isinf(s["epsilon_spent"]) else f"{s['epsilon_spent']:.2f}"
            lines.append(
                f"| {method} | {'∞' if epsilon == 'inf' else epsilon} | {spent} | "
                f"{s['personalized'][0]:.4f} ± {s['personalized'][1]:.4f} | "
                f"{s['global'][0]:.4f} ± {s['global'][1]:.4f} | {s['mib_total'][0]:.2f} | "
                f"{len(s['seeds'])} |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against ε (log x), one colour per method; "no DP" drawn right of the rest."""
    finite = sorted({float(e) for row in table.values() for e in row if e != "inf"})
    no_dp = (finite[-1] * 3) if finite else 1.0
    fig, ax = figure((6.4, 4.2))
    for colour, (method, row) in zip(colours(len(table)), table.items()):
        xs = [no_dp if e == "inf" else float(e) for e in row]
        order = sorted(range(len(xs)), key=xs.__getitem__)
        for key, style in (("personalized", "-o"), ("global", "--s")):
            ys = [list(row.values())[i][key] for i in order]
            ax.errorbar([xs[i] for i in order], [m for m, _ in ys], yerr=[s for _, s in ys],
                        fmt=style, color=colour, capsize=3, label=f"{method} {key}")
    ax.set_xscale("log")
    ax.set_xticks(finite + [no_dp], [f"{e:g}" for e in finite] + ["no DP"])
    ax.minorticks_off()
    ax.set_xlabel("target ε per client (δ = 1/n)")
    ax.set_ylabel("final accuracy")
    ax.set_title(title)
    save_figure(fig, ax, path, legend_beside=True)


def run_privacy_bench(  # pylint: disable=too-many-arguments
    preset: str, methods: list[str], epsilons: list[float], seeds: list[int], clients: int,
    out_dir: Path, overrides: dict[str, Any] | None = None, engine: str = "simulation",
    data_root: Path | None = None, resume: bool = False, existing_only: bool = False,
) -> dict[str, Any]:
    """Run every (method, ε, seed) with :func:`kta_flwr.tools.bench.run_bench`; write
    ``privacy.json``, ``privacy.md`` and ``accuracy_vs_epsilon.png``; return the table.
    ``resume``/``existing_only``: as for ``run_bench`` (reuse runs on disk / run nothing
    and summarise what is there)."""
    variants = [variant(m, e) for m in methods for e in epsilons]
    summary = run_bench(preset, variants, seeds, clients, out_dir, overrides, engine=engine,
                        data_root=data_root, resume=resume, existing_only=existing_only)
    runs = [RunResult(**run) for run in summary["runs"]]
    results_dir = out_dir / preset
    table = privacy_table(methods, epsilons, runs, results_dir / "runs")
    (results_dir / "privacy.json").write_text(json.dumps(
        {"preset": preset, "clients": clients, "seeds": seeds, "config": summary["config"],
         "methods": table, "missing_runs": summary["missing_runs"]}, indent=2, default=str))
    text = markdown(preset, table)
    if summary["missing_runs"]:
        text += f"- not run yet: {', '.join(summary['missing_runs'])}\n"
    (results_dir / "privacy.md").write_text(text)
    plot(table, results_dir / "accuracy_vs_epsilon.png", f"{preset}: {clients} clients, seeds {seeds}")
    print(text)
    print(f"[privacy] wrote {results_dir}/privacy.json, privacy.md, accuracy_vs_epsilon.png")
    return table


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = cli.benchmark_parser("python -m kta_flwr.tools.privacy_bench", __doc__,
                                  "run-config overrides on top of the preset")
    parser.add_argument("--methods", default="kta,fedavg,local",
                        help="comma list of strategies (each also at every ε)")
    parser.add_argument("--epsilons", default="1,3,8,inf",
                        help="target ε per client; inf: DP off")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs already in <out>/<preset>/runs made with the same config")
    parser.add_argument("--existing-only", action="store_true",
                        help="run nothing: summarise the runs already there, list the missing")
    return cli.run_benchmark_cli(parser, argv, lambda args, data_root: run_privacy_bench(
        args.preset, [m.strip() for m in args.methods.split(",") if m.strip()],
        parse_epsilons(args.epsilons), [int(s) for s in args.seeds.split(",")], args.clients,
        args.out, cli.overrides(args.set), args.engine, data_root, resume=args.resume,
        existing_only=args.existing_only,
    ))


if __name__ == "__main__":
    sys.exit(main())
