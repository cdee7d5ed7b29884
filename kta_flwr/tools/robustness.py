"""Attack benchmark: honest clients' accuracy under each attack and attacker share.

::

    python -m kta_flwr.tools.robustness --preset digits --clients 10 \\
        --strategies kta,fedmd,ktpfl,fedavg,fedmedian,krum,fedtrimmedavg \\
        --attacks gaming,rolled,sign-flip,cpa,celmax,scaled,confident-wrong,random,sybil,label-flip,negated,scaled-update \\
        --shares 0.1,0.2,0.3 --seeds 0

runs every (strategy, attack, share, seed) whose attack applies to the strategy's family
(an attack may carry its options: ``budgeted:attack-budget=0.1:attack-scale=0``)
(``kta_flwr.config.ATTACK_FAMILIES``), plus each strategy's clean run, through the
benchmark harness (:func:`kta_flwr.tools.bench.run_bench`, runs reused with ``--resume``
semantics), and writes to ``<out>/<preset>/``:

- ``robustness.json`` and ``robustness.csv``: per run, the honest clients' mean final
  personalized accuracy (the attackers' own rows left out), the same partitions' mean in
  the clean run of the same strategy and seed, and the change in points;
- ``robustness.md``: the table (mean drop over seeds, per strategy x attack x share);
- ``robustness.png``: drop against attacker share, one panel per attack.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from kta_flwr.client.attacks import attackers
from kta_flwr.config import ATTACK_FAMILIES, STRATEGY_FAMILIES, parse_run_config, stored_run_config
from kta_flwr.tools import cli
from kta_flwr.tools.bench import slug, run_bench
from kta_flwr.tools.plots import colours, panels, save_panels

PERSONALIZED = "personalized-accuracy"


def methods_for(strategies: list[str], attacks: list[str], shares: list[float]) -> list[str]:
    """The harness's method strings: each strategy (a name, or a variant such as
    ``fedavg-topk:update-aggregation=median``) clean, then under every attack that applies
    to its family at every share (``kta:attack=gaming:attack-fraction=0.2``)."""
    methods = []
    for strategy in strategies:
        methods.append(strategy)
        for attack in attacks:  # a name, or a variant: budgeted:attack-budget=0.1:attack-scale=0
            if STRATEGY_FAMILIES[strategy.split(":")[0]] in ATTACK_FAMILIES[attack.split(":")[0]]:
                methods += [f"{strategy}:attack={attack}:attack-fraction={share}" for share in shares]
    return methods


def client_accuracies(results_json: Path) -> dict[int, float]:
    """Each client's final personalized accuracy, by partition."""
    res = json.loads(results_json.read_text())
    return {int(c["partition-id"]): c[PERSONALIZED] for c in res["clients_last_round"]}


def _row(results_dir: Path, method: str, seed: int) -> dict[str, Any] | None:
    found = sorted((results_dir / "runs" / f"{slug(method)}-seed{seed}").glob("*/results.json"))
    if not found:
        return None
    cfg = parse_run_config(stored_run_config(json.loads(found[-1].read_text())["config"]))
    accuracies = client_accuracies(found[-1])
    hostile = attackers(cfg, len(accuracies))
    parts = method.split(":")
    variant = ":".join(p for p in parts if not p.startswith("attack"))
    options = [p.removeprefix("attack-") for p in parts
               if p.startswith("attack-") and not p.startswith("attack-fraction=")]
    attack = cfg.attack + (f" ({', '.join(options)})" if options else "")
    return {"strategy": variant, "attack": attack, "share": cfg.attack_fraction,
            "seed": seed, "attackers": sorted(hostile),
            "clients": {str(p): a for p, a in sorted(accuracies.items())}}


def _score(row: dict[str, Any], clean: dict[str, float]) -> None:
    """Add the honest clients' mean accuracy under attack and in the clean run (the same
    partitions), and the change in points; NaN when the last round has no valid
    evaluation of every honest client (e.g. a destroyed global model whose replies the
    boundary drops)."""
    honest = [p for p in clean if int(p) not in row["attackers"]]
    row["clean_accuracy"] = statistics.fmean(clean[p] for p in honest)
    if not all(p in row["clients"] for p in honest):  # evaluation replies missing or dropped
        row["honest_accuracy"] = row["drop_points"] = math.nan
        return
    row["honest_accuracy"] = statistics.fmean(row["clients"][p] for p in honest)
    row["drop_points"] = round(100 * (row["honest_accuracy"] - row["clean_accuracy"]), 2)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Mean drop (points) of honest accuracy vs clean, strategy x (attack, share)."""
    cells: dict[tuple[str, str, float], list[float]] = {}
    for row in rows:
        if row["attack"] != "none":
            cells.setdefault((row["strategy"], row["attack"], row["share"]), []).append(row["drop_points"])
    clean: dict[str, list[float]] = {}
    for row in rows:
        if row["attack"] == "none":
            clean.setdefault(row["strategy"], []).append(row["honest_accuracy"])
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    shares = sorted({s for _, _, s in cells})
    attacks = sorted({a for _, a, _ in cells})
    head = "| attack | share | " + " | ".join(strategies) + " |"
    lines = [head, "|" + "---|" * (len(strategies) + 2),
             "| none (clean accuracy) | 0% | " + " | ".join(
                 f"{statistics.fmean(clean[s]):.4f}" for s in strategies) + " |"]
    for attack in attacks:
        for share in shares:
            values = [cells.get((s, attack, share)) for s in strategies]
            if any(v is not None for v in values):
                text = ["" if v is None else _cell(v) for v in values]
                lines.append(f"| {attack} | {share:.0%} | " + " | ".join(text) + " |")
    return "\n".join(lines) + ("\n\nCells: honest clients' final personalized accuracy change vs the "
                               "same partitions in the clean run, in points (mean over seeds; "
                               "(n): seeds when more than one; empty: not run; collapsed: no valid "
                               "final evaluation of the honest clients, their replies out of bounds).\n")


def _cell(drops: list[float]) -> str:
    """Mean drop over seeds, ``collapsed`` when a seed's honest clients have no valid
    final evaluation."""
    if any(math.isnan(d) for d in drops):
        return "collapsed"
    return f"{statistics.fmean(drops):+.1f}" + (f" ({len(drops)})" if len(drops) > 1 else "")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Drop vs attacker share, one panel per attack, a line per strategy."""
    attacks = sorted({r["attack"] for r in rows if r["attack"] != "none"})
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    fig, axes = panels(len(attacks))
    for ax, attack in zip(axes, attacks):
        for strategy, colour in zip(strategies, colours(len(strategies))):
            points: dict[float, list[float]] = {0.0: [0.0]}
            for r in rows:
                if r["strategy"] == strategy and r["attack"] == attack and not math.isnan(r["drop_points"]):
                    points.setdefault(r["share"], []).append(r["drop_points"])
            if len(points) > 1:
                xs = sorted(points)
                ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", color=colour, label=strategy)
        ax.set_title(attack)
        ax.set_xlabel("attacker share")
        ax.set_ylabel("honest accuracy change (points)")
    save_panels(fig, axes, path)


def run_robustness(  # pylint: disable=too-many-arguments
    preset: str, strategies: list[str], attacks: list[str], shares: list[float], seeds: list[int],
    clients: int, out_dir: Path, overrides: dict[str, Any], engine: str, data_root: Path | None,
    existing_only: bool = False,
) -> list[dict[str, Any]]:
    """Run (or reuse) every run, then write the table, the CSV/JSON and the plot. With
    ``existing_only`` nothing runs: the table covers the runs already there (those with
    their strategy's clean run of the same seed)."""
    methods = methods_for(strategies, attacks, shares)
    run_bench(preset, methods, seeds, clients, out_dir, overrides, engine=engine,
              data_root=data_root, resume=True, existing_only=existing_only)
    results_dir = out_dir / preset
    found = [_row(results_dir, m, s) for s in seeds for m in methods]
    clean = {(r["strategy"], r["seed"]): r["clients"] for r in found if r and r["attack"] == "none"}
    rows = [r for r in found if r is not None and (r["strategy"], r["seed"]) in clean]
    for row in rows:
        _score(row, clean[(row["strategy"], row["seed"])])
    (results_dir / "robustness.json").write_text(json.dumps(rows, indent=2))
    columns = ["strategy", "attack", "share", "seed", "honest_accuracy", "clean_accuracy", "drop_points"]
    with (results_dir / "robustness.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (results_dir / "robustness.md").write_text(table)
    plot(rows, results_dir / "robustness.png")
    print(table)
    print(f"[robustness] wrote {results_dir}/robustness.json, .csv, .md, .png")
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = cli.benchmark_parser("python -m kta_flwr.tools.robustness", __doc__,
                                  "run-config overrides on top of the preset")
    parser.add_argument("--strategies", default="kta,fedmd,ktpfl,fedavg,fedmedian,krum,fedtrimmedavg")
    parser.add_argument("--attacks", default="gaming,confident-wrong,sybil,label-flip,negated")
    parser.add_argument("--shares", default="0.2")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--existing-only", action="store_true",
                        help="run nothing: tabulate the runs already in <out>/<preset>/runs")

    def split(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    return cli.run_benchmark_cli(parser, argv, lambda args, data_root: run_robustness(
        args.preset, split(args.strategies), split(args.attacks),
        [float(s) for s in split(args.shares)], [int(s) for s in split(args.seeds)],
        args.clients, args.out, cli.overrides(args.set), args.engine, data_root,
        existing_only=args.existing_only,
    ))


if __name__ == "__main__":
    sys.exit(main())
