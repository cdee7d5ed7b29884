"""Benchmark harness: every method side by side, through the real Flower app.

::

    python -m kta_flwr.tools.bench --preset cifar10_simplecnn \\
        --methods kta,fedavg,fedprox,fedmd,ktpfl,local --seeds 0,1,2 --clients 10

runs each (method, seed) in turn on one local simulation SuperLink (or on a SuperLink +
SuperNodes on loopback with ``--engine deployment``), on the same partitions and seeds,
prints a progress line per run, and writes to ``<out>/<preset>/``:

- ``summary.json``: per-run finals and curves, per-method mean and std, paper figures;
- ``summary.md``: the table (mean ± std over seeds of final personalized and global
  accuracy, total MiB, MiB to reach ``--target`` personalized accuracy, wall time),
  with the paper's published figures, the known differences in setting, and how many
  runs ran on which machine (CPU, SIMD, torch: what float rounding depends on);
- ``accuracy_vs_mib.png``: mean personalized accuracy against cumulative MiB (log x).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kta_flwr.config import (
    DATA_ROOT,
    MARKET_STRATEGIES,
    TRACKING_KEYS,
    ConfigError,
    RunConfig,
    parse_run_config,
    stored_run_config,
)
from kta_flwr.tools import cli
from kta_flwr.tools.federation import LocalFederation
from kta_flwr.tools.paths import REPO_ROOT
from kta_flwr.tools.plots import colours, figure, save_figure
from kta_flwr.tools.presets import load_preset, parse_override

MIB = 1024 * 1024

#: The paper's published figures per preset: method -> (accuracy %, MiB or None).
PAPER: dict[str, dict[str, tuple[float, float | None]]] = {
    "cifar10_resnet18": {"kta": (57.7, 3.8), "fedavg": (42.1, 4265.5)},
    "cifar10_simplecnn": {"kta": (49.3, 7.6)},
    "agnews": {"kta": (89.3, 3.1)},
    "femnist": {"kta": (74.5, None)},
}
#: Differences in setting we know of, per dataset.
SETTING_NOTES: dict[str, list[str]] = {
    "cifar10": [
        "shared CIFAR-10 copy is partial: 5,085 of 50,000 training and 1,017 of 10,000 test images",
        "personalized accuracy = global test set re-weighted to each client's label mix (the paper's protocol is unpublished)",
        "kta sends no targets in round 1: (R-1) downloads vs the paper's R",
    ],
    "agnews": [
        "only the 7,600-row official test split exists offline: split into test / reference / client training",
        "bag-of-embeddings text model (the paper's is undescribed beyond its size)",
    ],
    "femnist": [
        "shared FEMNIST copy is a ~5% LEAF sample (105 writers)",
        "personalized accuracy = each client's own writers' test rows",
    ],
}


@dataclass
class RunResult:
    """One (method, seed) run, read back from its results.json."""

    method: str
    seed: int
    final_personalized: float
    final_global: float
    mib_total: float
    wall_seconds: float
    curve: list[tuple[float, float, float]] = field(default_factory=list)  # (cum MiB, pers, glob)
    #: Where it ran (:func:`machine_of`); "" for a run made before results.json recorded it.
    machine: str = ""
    #: A fleet's run: per tier, its ``summary.tiers`` entry (model, partitions, accuracies,
    #: bytes, seconds per train reply); empty otherwise.
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The market's server-side global model on the whole test set (``server-model``); NaN without one.
    final_server_global: float = math.nan
    #: Newcomers (``newcomer-fraction``): rounds since joining -> their mean personalized
    #: accuracy (``summary.newcomers``); empty without them.
    newcomers: dict[str, float] = field(default_factory=dict)

    def mib_to_reach(self, target: float) -> float | None:
        """Cumulative MiB at the first round whose personalized accuracy >= ``target``."""
        return next((mib for mib, pers, _ in self.curve if pers >= target), None)


def method_config(base: RunConfig, method: str) -> RunConfig:
    """``base`` for one method of ``--methods``: a strategy name, optionally with run-config
    changes after colons, e.g. ``kta:codec=int8`` or ``kta:market=fixed:similarity-tau=0.1``."""
    name, *changes = method.split(":")
    values = {**base.to_flwr(), "strategy": name, **dict(parse_override(c) for c in changes)}
    return parse_run_config(values)


def slug(method: str) -> str:
    """A folder name for ``method`` (``kta:codec=int8`` -> ``kta_codec-int8``)."""
    return method.replace(":", "_").replace("=", "-").replace("/", "-")


def read_run(results_json: Path, method: str, seed: int) -> RunResult:
    """A :class:`RunResult` from a run's ``results.json``; its wall seconds are the
    ServerApp's, first round to last (the same for a run made now or read back)."""
    res = json.loads(results_json.read_text())
    curve = [
        ((row["cum_bytes_up"] + row["cum_bytes_down"]) / MIB, row["personalized-accuracy"],
         row["global-accuracy"])
        for row in res["rounds"]
        if not math.isnan(row["personalized-accuracy"])  # rounds without evaluation
    ]
    summary = res["summary"]
    return RunResult(
        method, seed, summary["final_personalized_accuracy"], summary["final_global_accuracy"],
        summary["mib_total"], summary["seconds"], curve, machine_of(res.get("environments", [])),
        summary.get("tiers", {}), summary.get("final_server_global_accuracy", math.nan),
        summary.get("newcomers", {}).get("personalized_after_rounds", {}),
    )


def _simd_of(env: dict[str, Any]) -> str:
    if "simd" not in env:
        return "SIMD not recorded"
    return env["simd"] or "SIMD unknown"


def machine_of(environments: list[dict[str, Any]]) -> str:
    """``"<cpu> / <simd> / torch <version>"`` of a run's recorded environments (one per
    part of a resumed run, distinct ones joined by `` + ``); what decides its float
    rounding on a CPU. "" when none was recorded; "SIMD unknown" where the host did not
    say (not Linux), "SIMD not recorded" for a run made before the field existed."""
    names = [f"{env['cpu']} / {_simd_of(env)} / torch {env.get('versions', {}).get('torch')}"
             for env in environments if env]
    return " + ".join(dict.fromkeys(names))


def machines_note(runs: list[RunResult]) -> str:
    """A footnote saying how many runs ran where (mixing machines can shift results by
    float rounding amplified over rounds)."""
    where = Counter(run.machine for run in runs if run.machine)
    parts = [f"{n} on {machine}" for machine, n in where.most_common()]
    unrecorded = sum(not run.machine for run in runs)
    if unrecorded:
        parts.append(f"{unrecorded} not recorded (made before results.json kept it)")
    return "- runs by machine (CPU / widest SIMD / torch): " + "; ".join(parts) + "\n"


def reusable_run(run_dir: Path, cfg: RunConfig) -> Path | None:
    """The ``results.json`` of an earlier run in ``run_dir`` made with ``cfg`` (``output-dir``,
    ``model-dir`` and the tracking keys aside; keys the earlier run did not have must be at
    what it ran with, :func:`~kta_flwr.config.stored_run_config`)
    that completed all its rounds (a run cut short writes one after every round), else None."""
    found = sorted(run_dir.glob("*/results.json"))
    if not found:
        return None
    earlier = json.loads(found[-1].read_text())
    if len(earlier.get("rounds", [])) < cfg.num_server_rounds:
        return None
    old = stored_run_config(earlier["config"])
    defaults = RunConfig().to_flwr()
    for key, value in cfg.to_flwr().items():
        if key not in ("output-dir", "model-dir", *TRACKING_KEYS) and old.get(key, defaults[key]) != value:
            return None
    return found[-1]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[RunResult], target: float) -> dict[str, dict[str, Any]]:
    """Per method: mean and std over seeds of every reported quantity."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        reach = [r.mib_to_reach(target) for r in mine]
        out[method] = {
            "seeds": [r.seed for r in mine],
            "personalized": _mean_std([r.final_personalized for r in mine]),
            "global": _mean_std([r.final_global for r in mine]),
            "server_global": _mean_std([r.final_server_global for r in mine
                                        if not math.isnan(r.final_server_global)]),
            "newcomers": {k: _mean_std([r.newcomers[k] for r in mine
                                        if not math.isnan(r.newcomers.get(k, math.nan))])
                          for k in dict.fromkeys(k for r in mine for k in r.newcomers)},
            "mib_total": _mean_std([r.mib_total for r in mine]),
            "mib_to_target": _mean_std([m for m in reach if m is not None]),
            "reached_target": sum(m is not None for m in reach),
            "wall_seconds": _mean_std([r.wall_seconds for r in mine]),
        }
    return out


def paired_differences(runs: list[RunResult], baseline: str) -> dict[str, list[tuple[int, float]]]:
    """Per method other than ``baseline``: ``(seed, difference)`` for every seed both ran,
    the difference being its final personalized accuracy minus the baseline's on that seed
    (same partitions and initialisations), in accuracy points (0-100 scale)."""
    base = {r.seed: r.final_personalized for r in runs if r.method == baseline}
    out: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        if run.method != baseline and run.seed in base:
            out.setdefault(run.method, []).append(
                (run.seed, 100 * (run.final_personalized - base[run.seed])))
    return out


def _paired_cell(diffs: list[tuple[int, float]]) -> str:
    """``-0.49 (-0.82 / -0.40 / -0.26)``: the mean, then each seed's difference."""
    def points(value: float) -> str:
        return f"{round(value, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"

    if not diffs:
        return "—"
    each = " / ".join(points(d) for _, d in sorted(diffs))
    return f"{points(statistics.fmean(d for _, d in diffs))} ({each})"


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The methods no other method beats: none with at most their traffic has a higher
    accuracy. ``points``: method -> (MiB, accuracy); returned by increasing MiB."""
    front = []
    for method, (mib, acc) in sorted(points.items(), key=lambda item: (item[1][0], -item[1][1])):
        if not any(other <= mib and better > acc for other, better in points.values()):
            front.append(method)
    return front


def front_of(stats: dict[str, dict[str, Any]]) -> list[str]:
    """:func:`pareto_front` of the mean total MiB and mean personalized accuracy."""
    return pareto_front({m: (s["mib_total"][0], s["personalized"][0]) for m, s in stats.items()
                         if not math.isnan(s["personalized"][0])})


def seeds_with_runs(stats: dict[str, dict[str, Any]]) -> list[int]:
    """The seeds that have a run in ``stats`` (:func:`aggregate`), sorted: fewer than asked
    for when a queue was cut short."""
    return sorted({seed for s in stats.values() for seed in s["seeds"]})


def markdown_table(preset: str, cfg: RunConfig, stats: dict[str, dict[str, Any]], target: float,
                   paired: tuple[str, dict[str, list[tuple[int, float]]]] | None = None) -> str:
    """The summary table, with the paper's figures and the known setting differences;
    ``paired`` = (baseline, :func:`paired_differences`) adds a column of them."""
    paper = PAPER.get(preset, {})

    def pm(pair: tuple[float, float], digits: int = 4) -> str:
        mean, std = pair
        return "—" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    server = any(not math.isnan(s.get("server_global", (math.nan,))[0]) for s in stats.values())
    after = sorted({k for s in stats.values() for k in s.get("newcomers", {})}, key=int)
    lines = [
        "| method | personalized acc. | global acc. | " + ("server model acc. | " if server else "")
        + "".join(f"newcomers after {k} | " for k in after)
        + f"total MiB | MiB to {target:.2f} pers. | wall s "
        "| Pareto | paper |" + (f" Δ pers. vs {paired[0]} (points), by seed |" if paired else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if server else "") + "---|" * len(after)
        + ("---|" if paired else ""),
    ]
    front = front_of(stats)
    for method, s in stats.items():
        reach = pm(s["mib_to_target"], 3) + f" ({s['reached_target']}/{len(s['seeds'])})"
        fig = paper.get(method)
        paper_txt = "—" if fig is None else f"{fig[0]}%" + (f" @ {fig[1]} MiB" if fig[1] else "")
        lines.append(
            f"| {method} | {pm(s['personalized'])} | {pm(s['global'])} | "
            + (f"{pm(s['server_global'])} | " if server else "")
            + "".join(f"{pm(s['newcomers'].get(k, (math.nan, math.nan)))} | " for k in after)
            + f"{pm(s['mib_total'], 3)} "
            f"| {reach} | {pm(s['wall_seconds'], 0)} | {'✓' if method in front else ''} | {paper_txt} |"
            + (f" {_paired_cell(paired[1].get(method, []))} |" if paired else "")
        )
    notes = SETTING_NOTES.get(cfg.dataset, [])
    lines += ["", f"Preset `{preset}`: {cfg.num_server_rounds} rounds, models `{cfg.models}`, "
              f"reference {cfg.reference_size}, partitioner {cfg.partitioner}"
              + (f" (alpha {cfg.dirichlet_alpha})" if cfg.partitioner == "dirichlet" else "")
              + f", max-train-size {cfg.max_train_size or 'all'}; mean ± std over seeds "
              f"{seeds_with_runs(stats)}."]
    lines += ["- Pareto ✓: no method with at most its mean traffic has a higher mean "
              "personalized accuracy.",
              "- wall s: the ServerApp's seconds from start to its last round (Flower's and "
              "Ray's start-up not included)."]
    if server:
        lines.append("- server model acc.: the global model the server distils from the market's "
                     "consensus on the public rows (`server-model`), on the whole test set.")
    if after:
        lines.append("- newcomers after k: the personalized accuracy of the clients that joined in "
                     "`newcomer-round`, after k rounds in the fleet (evaluated in round "
                     "`newcomer-round` + k - 1).")
    if paired:
        lines.append(f"- Δ pers. vs {paired[0]}: final personalized accuracy minus {paired[0]}'s "
                     "on the same seed (same partitions), mean and each seed in seed order.")
    lines += [f"- differs from the paper: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def tier_table(runs: list[RunResult]) -> str:
    """Per method and tier of a fleet (mean ± std over seeds): the tier's model, final
    personalized and global accuracy, MiB per client (all phases, both ways) and client
    seconds per train reply; empty when no run has tiers."""
    rows = ["| method | tier | model | personalized acc. | global acc. | MiB per client | s per train reply |",
            "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r.method for r in runs if r.tiers):
        mine = [r for r in runs if r.method == method and r.tiers]
        for tier, first in mine[0].tiers.items():
            entries = [r.tiers[tier] for r in mine if tier in r.tiers]
            cells = [_mean_std([e[key] for e in entries if not math.isnan(e[key])])
                     for key in ("personalized-accuracy", "global-accuracy")]
            mib = _mean_std([(e["bytes_up"] + e["bytes_down"]) / MIB / max(1, len(e["partitions"]))
                             for e in entries])
            seconds = _mean_std([e["train_seconds_per_reply"] for e in entries])
            rows.append(f"| {method} | {tier} | {first['model']} | {cells[0][0]:.4f} ± {cells[0][1]:.4f} "
                        f"| {cells[1][0]:.4f} ± {cells[1][1]:.4f} | {mib[0]:.3f} | {seconds[0]:.2f} |")
    return "\n".join(rows) + "\n" if len(rows) > 2 else ""


def plot(runs: list[RunResult], path: Path, title: str, front: list[str] | None = None) -> None:
    """Mean personalized accuracy against cumulative MiB (log x), one curve per method;
    methods that send nothing (local) are a dashed horizontal line at their final mean;
    the final points of the ``front`` methods joined by a black step line (Pareto front)."""
    methods = list(dict.fromkeys(r.method for r in runs))
    fig, ax = figure((7, 4.5) if len(methods) <= 8 else (11, 5.5))
    palette = colours(len(methods))
    for colour, method in zip(palette, methods):
        mine = [r for r in runs if r.method == method]
        rounds = min(len(r.curve) for r in mine)
        mib = [statistics.fmean(r.curve[i][0] for r in mine) for i in range(rounds)]
        acc = [statistics.fmean(r.curve[i][1] for r in mine) for i in range(rounds)]
        if mib[-1] <= 0:
            ax.axhline(acc[-1], linestyle="--", color="grey", label=f"{method} (0 bytes)")
        else:  # knowledge (market) methods solid, parameter methods dashed
            style = "-" if method.split(":")[0] in MARKET_STRATEGIES else "--"
            ax.plot(mib, acc, style, marker="o", markersize=3, label=method, color=colour)
    finals = {}
    for method in front or []:
        mine = [r for r in runs if r.method == method]
        finals[method] = (statistics.fmean(r.mib_total for r in mine),
                          statistics.fmean(r.final_personalized for r in mine))
    sent = sorted(p for p in finals.values() if p[0] > 0)
    if sent:
        ax.step(*zip(*sent), where="post", color="black", lw=1.2, alpha=0.7, label="Pareto front")
        ax.scatter(*zip(*sent), s=60, facecolors="none", edgecolors="black", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative traffic, up + down (MiB, log scale)")
    ax.set_ylabel("mean personalized test accuracy")
    ax.set_title(title)
    save_figure(fig, ax, path)


def run_bench(  # pylint: disable=too-many-arguments,too-many-locals
    preset: str,
    methods: list[str],
    seeds: list[int],
    clients: int,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
    target: float | None = None,
    engine: str = "simulation",
    data_root: Path | None = None,
    run_timeout: float = 24 * 3600,
    resume: bool = False,
    existing_only: bool = False,
    paired_with: str | None = None,
) -> dict[str, Any]:
    """Run every (method, seed), write summary.json/summary.md/plot; returns the summary.

    With ``resume``, a (method, seed) whose run folder already holds a run of the same
    config is read back instead of run again. With
    ``existing_only``, nothing runs: the summary covers the runs already there, and the
    missing ones are listed (e.g. for a queue cut short). ``paired_with`` (one of
    ``methods``) adds each method's per-seed difference to it (:func:`paired_differences`).
    """
    if paired_with is not None and paired_with not in methods:
        raise ConfigError(f"--paired-with: {paired_with!r} is not one of --methods {methods}")
    base = load_preset(preset, {"min-nodes": clients, **(overrides or {})})
    base = base.rooted(data_root or DATA_ROOT)
    # Reject a bad method or variant before anything runs.
    configs = {method: method_config(base, method).rooted(data_root or DATA_ROOT) for method in methods}
    results_dir = out_dir / preset
    results_dir.mkdir(parents=True, exist_ok=True)
    runs: list[RunResult] = []
    total = len(methods) * len(seeds)
    missing: list[str] = []
    with contextlib.ExitStack() as stack:
        fed = None
        if not existing_only:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="kta-bench-"))
            fed = stack.enter_context(LocalFederation(Path(work), clients, simulation=engine == "simulation"))
        for i, (seed, method) in enumerate(((s, m) for s in seeds for m in methods), 1):
            run_dir = results_dir / "runs" / f"{slug(method)}-seed{seed}"
            cfg = configs[method].replace(seed=seed, output_dir=str(run_dir.resolve()),
                                          model_dir=str((run_dir / "models").resolve()))
            earlier = reusable_run(run_dir, cfg) if resume or existing_only else None
            if earlier is not None:
                runs.append(read_run(earlier, method, seed))
                print(f"[bench {i}/{total}] {method} seed {seed}: reusing {earlier}", flush=True)
                continue
            if fed is None:
                missing.append(f"{method} seed {seed}")
                print(f"[bench {i}/{total}] {method} seed {seed}: no run yet, left out", flush=True)
                continue
            print(f"[bench {i}/{total}] {preset}: {method}, seed {seed} ...", flush=True)
            start = time.monotonic()
            proc = fed.submit(REPO_ROOT, cfg.to_flwr(), timeout=run_timeout)
            wall = time.monotonic() - start
            found = sorted(run_dir.glob("*/results.json"))
            if proc.returncode != 0 or not found:
                tail = (proc.stdout + proc.stderr)[-3000:]
                raise RuntimeError(f"{method} seed {seed} failed (rc {proc.returncode}):\n{tail}")
            run = read_run(found[-1], method, seed)
            runs.append(run)
            print(f"[bench {i}/{total}] {method} seed {seed}: personalized "
                  f"{run.final_personalized:.4f}, global {run.final_global:.4f}, "
                  f"{run.mib_total:.4f} MiB, {wall:.0f} s", flush=True)
    if not runs:
        raise ConfigError(f"no runs to summarise in {results_dir / 'runs'}")
    if target is None:  # default: 90% of the best final mean personalized accuracy
        finals = aggregate(runs, 1.0)
        target = 0.9 * max(s["personalized"][0] for s in finals.values())
    stats = aggregate(runs, target)
    paired = None if paired_with is None else (paired_with, paired_differences(runs, paired_with))
    summary = {
        "preset": preset, "clients": clients, "engine": engine, "target": target,
        "missing_runs": missing,
        "config": base.to_flwr(), "methods": stats, "pareto_front": front_of(stats),
        "paper": PAPER.get(preset, {}),
        "setting_notes": SETTING_NOTES.get(base.dataset, []),
        "runs": [run.__dict__ for run in runs],
    }
    if paired:
        summary["paired_differences"] = {"baseline": paired[0], "points_by_method": paired[1]}
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    table = markdown_table(preset, base, stats, target, paired)
    table += machines_note(runs)
    if missing:
        table += f"- not run yet: {', '.join(missing)}\n"
    tiers = tier_table(runs)
    if tiers:
        table += "\nPer tier of the fleet (MiB per client: train and evaluation, both ways):\n\n" + tiers
    (results_dir / "summary.md").write_text(table)
    plot(runs, results_dir / "accuracy_vs_mib.png",
         f"{preset}: {clients} clients, seeds {seeds_with_runs(stats)}",
         summary["pareto_front"])
    print(table)
    print(f"[bench] wrote {results_dir}/summary.json, summary.md, accuracy_vs_mib.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = cli.benchmark_parser("python -m kta_flwr.tools.bench", __doc__,
                              "run-config overrides on top of the preset")
    parser.add_argument("--methods", default="kta,fedavg,fedprox,fedmd,ktpfl,local",
                        help="comma list of strategies, each optionally with run-config "
                        "changes after colons: kta,kta:codec=int8,kta:codec=topk:codec-topk=2")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--target", type=float, default=None,
                        help="personalized accuracy for 'MiB to target' (default: 90%% of the best)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs already in <out>/<preset>/runs made with the same config")
    parser.add_argument("--existing-only", action="store_true",
                        help="run nothing: summarise the runs already there, list the missing")
    parser.add_argument("--paired-with", default=None, metavar="METHOD",
                        help="one of --methods: add each method's per-seed difference to it")
    return cli.run_benchmark_cli(parser, argv, lambda args, data_root: run_bench(
        args.preset, [m.strip() for m in args.methods.split(",") if m.strip()],
        [int(s) for s in args.seeds.split(",")], args.clients, args.out,
        cli.overrides(args.set), args.target, args.engine,
        data_root, resume=args.resume, existing_only=args.existing_only,
        paired_with=args.paired_with,
    ))


if __name__ == "__main__":
    sys.exit(main())
