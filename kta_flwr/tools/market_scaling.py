"""Market scaling benchmark: seconds and peak memory of one market round against K clients.

::

    python -m kta_flwr.tools.market_scaling --clients 10,100,300,1000 --rows 1000 --classes 62

Each point runs :func:`kta_flwr.maths.market.run_market` ``--repeats`` times in a fresh
Python process (the median round, as a server sees from its second round on, and the
first; the peak RSS, and the rise over the RSS the process had with the inputs built and
the libraries loaded: the round's own memory), on seeded random
float32 logits ``[K, N, C]`` with labels and the default held-out rows (targets on the
other rows, the call :class:`kta_flwr.flower.strategies.market.KnowledgeMarket` makes), with kta's
default market (``market_params`` of the default run config: adaptive tau, prior
correction, gate, defences). Variants:

- ``reference``: the direct transcription (:mod:`kta_flwr.maths.market_reference`), the
  market of every release up to issue 19; skipped where its K² extrapolation from the last
  point exceeds ``--reference-budget`` seconds;
- ``exact``: the same market on the fast kernels (the default);
- ``fast``: plus the speed options ``--fast-set`` (default ``divergence-rows=32
  neighbours=16 divergence=hellinger``), which change the results (their accuracy effect:
  ``docs/scaling.md``).

Writes ``<out>/market_scaling/market_scaling.json``, ``.csv``, ``.md`` and
``market_seconds_vs_clients.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kta_flwr.config import RunConfig
from kta_flwr.factory import market_params
from kta_flwr.flower.protocol import held_out_mask
from kta_flwr.flower.results import peak_rss_mib
from kta_flwr.maths.market import run_market
from kta_flwr.maths.market_kernels import FAST
from kta_flwr.maths.market_reference import REFERENCE
from kta_flwr.tools.efficiency import hardware
from kta_flwr.tools.paths import REPO_ROOT
from kta_flwr.tools.plots import figure, save_figure
from kta_flwr.tools.presets import parse_override

VARIANTS = ("reference", "exact", "fast")


def market_round(clients: int, rows: int, classes: int, variant: str,  # pylint: disable=too-many-arguments
                 fast_set: dict[str, Any], repeats: int = 1) -> dict[str, float]:
    """Time ``repeats`` market rounds on the same inputs in this process; returns the
    median and the first round's seconds (the first one also pays for the process's
    first touch of its memory) and the peak RSS (MiB)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows)
    logits = rng.normal(0, 2, (clients, rows, classes)).astype(np.float32)
    logits[:, np.arange(rows), labels] += rng.uniform(0, 4, (clients, 1)).astype(np.float32)
    cfg = RunConfig()
    if variant == "fast":
        cfg = cfg.replace(**{key.replace("-", "_"): value for key, value in fast_set.items()})
    params = market_params(cfg)
    held_out = held_out_mask(rows, cfg.holdout, cfg.seed)
    kernels = REFERENCE if variant == "reference" else FAST
    before = peak_rss_mib()
    seconds = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run_market(logits, labels, params, held_out, kernels=kernels, target_rows=~held_out)
        seconds.append(time.perf_counter() - start)
    return {"seconds": float(np.median(seconds)), "first_seconds": seconds[0],
            "rounds": len(seconds), "peak_rss_mib": peak_rss_mib(), "rss_before_mib": before,
            "input_mib": logits.nbytes / 2**20}


def measure(clients: int, rows: int, classes: int, variant: str,  # pylint: disable=too-many-arguments
            fast_set: dict[str, Any], repeats: int) -> dict[str, Any]:
    """:func:`market_round` in a fresh Python process."""
    proc = subprocess.run(
        [sys.executable, "-m", "kta_flwr.tools.market_scaling", "--worker",
         json.dumps([clients, rows, classes, variant, fast_set, repeats])],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} market at K = {clients} failed:\n{proc.stderr[-3000:]}")
    return {"clients": clients, "variant": variant, **json.loads(proc.stdout.strip().splitlines()[-1])}


def markdown(report: dict[str, Any]) -> str:
    """Seconds and peak memory per K, one column pair per variant."""
    by = {(p["clients"], p["variant"]): p for p in report["points"]}
    head = "| K | " + " | ".join(f"{v} s | {v} peak MiB (+ round)" for v in VARIANTS) + " |"
    lines = [
        f"N = {report['rows']:,} reference rows, C = {report['classes']} classes, kta's default "
        f"market; fast = {report['fast_set']}; seconds: median of {report['repeats']} rounds "
        f"in one process; {report['hardware']}, {report['date']}.", "",
        head, "|" + "---|" * (1 + 2 * len(VARIANTS)),
    ]
    for clients in report["clients"]:
        cells = []
        for variant in VARIANTS:
            p = by.get((clients, variant))
            cells += ["not run", ""] if p is None else [
                f"{p['seconds']:.2f}",
                f"{p['peak_rss_mib']:,.0f} (+{p['peak_rss_mib'] - p['rss_before_mib']:,.0f})"]
        lines.append(f"| {clients:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Log-log seconds per round against K, one line per variant."""
    fig, ax = figure((6, 4))
    for variant, marker in zip(VARIANTS, "o^s"):
        mine = [(p["clients"], p["seconds"]) for p in report["points"] if p["variant"] == variant]
        if mine:
            ax.plot(*zip(*mine), marker=marker, label=variant)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients in the market (K)")
    ax.set_ylabel("seconds per market round")
    ax.set_title(f"Market round vs K (N = {report['rows']}, C = {report['classes']})", fontsize=9)
    save_figure(fig, ax, path)


def run_market_scaling(  # pylint: disable=too-many-arguments
    clients: list[int], rows: int, classes: int, out_dir: Path,
    fast_set: dict[str, Any], reference_budget: float, repeats: int = 3,
) -> dict[str, Any]:
    """Every point; writes the report files."""
    results_dir = out_dir / "market_scaling"
    results_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "rows": rows, "classes": classes, "clients": clients, "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d"), "reference_budget_seconds": reference_budget,
        "repeats": repeats,
        "fast_set": " ".join(f"{k}={v}" for k, v in fast_set.items()), "points": [],
    }
    last_reference: dict[str, Any] | None = None
    for num in clients:
        for variant in VARIANTS:
            if variant == "reference" and last_reference is not None:
                guess = last_reference["seconds"] * (num / last_reference["clients"]) ** 2
                if guess * repeats > reference_budget:
                    print(f"[market-scaling] reference at K = {num}: ~{guess:.0f} s by K², skipped")
                    continue
            point = measure(num, rows, classes, variant, fast_set, repeats)
            report["points"].append(point)
            if variant == "reference":
                last_reference = point
            print(f"[market-scaling] K = {num:5d} {variant:9s} {point['seconds']:8.2f} s "
                  f"(first {point['first_seconds']:.2f} s) peak {point['peak_rss_mib']:7.0f} MiB",
                  flush=True)
    (results_dir / "market_scaling.json").write_text(json.dumps(report, indent=2))
    with (results_dir / "market_scaling.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(report["points"][0]))
        writer.writeheader()
        writer.writerows(report["points"])
    plot(report, results_dir / "market_seconds_vs_clients.png")
    table = markdown(report)
    (results_dir / "market_scaling.md").write_text(table)
    print(table)
    print(f"[market-scaling] wrote {results_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # internal: one point in its own process
        print(json.dumps(market_round(*json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m kta_flwr.tools.market_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100,300,1000")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=62)
    parser.add_argument("--fast-set", nargs="*", metavar="KEY=VALUE",
                        default=["divergence-rows=32", "neighbours=16", "divergence=hellinger"])
    parser.add_argument("--reference-budget", type=float, default=600.0,
                        help="skip the reference market where K² extrapolation of its "
                             "rounds exceeds this (s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="market rounds per point, in one process (the median is reported)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    run_market_scaling([int(n) for n in args.clients.split(",") if n.strip()], args.rows,
                       args.classes, args.out, dict(parse_override(s) for s in args.fast_set),
                       args.reference_budget, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
