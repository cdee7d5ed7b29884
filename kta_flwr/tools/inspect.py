"""Look at what the market decided, round by round, from a run folder::

    python -m kta_flwr.tools.inspect ~/kta-flwr/outputs/20261130-001500-kta

reads the round files the ServerApp keeps (``rounds/round-*.npz``,
:mod:`kta_flwr.flower.round_log`), prints one line per round (clients priced, uploads,
distilling clients, median τ, effective teachers, self weight, MiB up/down) and draws,
into the run folder:

- ``market_teachers.png``: who teaches whom, the teacher-weight matrix (student rows,
  teacher columns, by partition id) in up to ``--panels`` rounds;
- ``market_tau_gate.png``: each client's τ over the rounds (colour, log scale), a cross
  where the gate kept its targets back, and the number of distilling clients per round;
- ``client_accuracy.png``: each client's personalized accuracy in the evaluated rounds and
  its reference accuracy as the market judged it (thin lines; the mean bold);
- ``class_priors.png``: each client's class prior in the last market round;
- ``tier_accuracy.png`` (runs of a ``fleet``): each tier's mean personalized and global
  accuracy in the evaluated rounds, so a small device's model is seen apart from a big one's.

Runs of strategies without a market (FedAvg, Ditto, ...) have only the evaluation: the
accuracy plot is drawn, the rest is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kta_flwr.config import parse_run_config, stored_run_config
from kta_flwr.flower.round_log import dense_weights, read_rounds
from kta_flwr.tools.plots import close_figure, figure

MIB = 2**20


def round_lines(rounds: dict[int, dict[str, np.ndarray]]) -> list[str]:
    """One summary line per market round (none for rounds without a market)."""
    lines = ["round | clients | uploads | distilling | median tau | eff. teachers | self weight "
             "| MiB up | MiB down"]
    for server_round, arrays in rounds.items():
        if "weight" not in arrays:
            continue
        weights = dense_weights(arrays)
        nonzero = np.clip(weights, 1e-12, 1.0)
        effective = np.exp(-(weights * np.log(nonzero)).sum(axis=1))
        lines.append(
            f"{server_round:5d} | {len(arrays['partition']):7d} | {int(arrays['uploaded'].sum()):7d} | "
            f"{int(arrays['distill'].sum()):10d} | {np.nanmedian(arrays['tau']):10.4g} | "
            f"{effective.mean():13.2f} | {np.diag(weights).mean():11.3f} | "
            f"{arrays['bytes_up'].sum() / MIB:6.3f} | {arrays['bytes_down'].sum() / MIB:8.3f}")
    return lines


def _clients(rounds: dict[int, dict[str, np.ndarray]], key: str) -> list[int]:
    return sorted({int(p) for arrays in rounds.values() if key in arrays for p in arrays[key]})


def _per_client(rounds: dict[int, dict[str, np.ndarray]], clients: list[int], index_key: str,
                value_key: str) -> np.ndarray:
    """``[clients, rounds]`` of ``value_key`` (nan where a client has no value)."""
    table = np.full((len(clients), len(rounds)), np.nan)
    where = {c: i for i, c in enumerate(clients)}
    for col, arrays in enumerate(rounds.values()):
        if value_key in arrays:
            for part, value in zip(arrays[index_key], arrays[value_key]):
                table[where[int(part)], col] = value
    return table


def plot_teachers(rounds: dict[int, dict[str, np.ndarray]], path: Path, panels: int) -> None:
    """Teacher-weight heatmaps of up to ``panels`` market rounds, evenly spread."""
    market = [r for r, a in rounds.items() if "weight" in a]
    shown = [market[i] for i in np.unique(np.linspace(0, len(market) - 1, min(panels, len(market))).round().astype(int))]
    fig, axes = figure((3.6 * len(shown) + 0.8, 3.6), 1, len(shown), squeeze=False)
    image = None
    for ax, server_round in zip(axes[0], shown):
        arrays = rounds[server_round]
        image = ax.imshow(dense_weights(arrays), cmap="viridis", vmin=0.0, vmax=1.0)
        ticks = np.arange(len(arrays["partition"]))
        if len(ticks) <= 20:
            ax.set_xticks(ticks, arrays["partition"], fontsize=7)
            ax.set_yticks(ticks, arrays["partition"], fontsize=7)
        ax.set_title(f"round {server_round}: {int(arrays['distill'].sum())}/{len(ticks)} distill", fontsize=9)
        ax.set_xlabel("teacher (partition)")
        ax.set_ylabel("student (partition)")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="teacher weight")
    close_figure(fig, path, tight_layout=False)


def plot_tau_gate(rounds: dict[int, dict[str, np.ndarray]], path: Path) -> None:
    """τ per client and round (log colour), crosses where the gate held targets back, and
    the distilling clients per round."""
    market = {r: a for r, a in rounds.items() if "weight" in a}
    clients = _clients(market, "partition")
    tau = _per_client(market, clients, "partition", "tau")
    held = _per_client(market, clients, "partition", "distill") == 0
    fig, (left, right) = figure((10, 3.8), 1, 2, gridspec_kw={"width_ratios": [2, 1]})
    with np.errstate(divide="ignore", invalid="ignore"):
        image = left.imshow(np.log10(tau), aspect="auto", cmap="magma", interpolation="nearest")
    rows, cols = np.nonzero(held)
    left.scatter(cols, rows, marker="x", color="cyan", s=14, label="gate: no targets")
    left.set_xticks(range(len(market)), list(market), fontsize=7)
    if len(clients) <= 20:
        left.set_yticks(range(len(clients)), clients, fontsize=7)
    left.set_xlabel("round")
    left.set_ylabel("client (partition)")
    left.set_title("similarity temperature τ per client", fontsize=9)
    left.legend(loc="upper right", fontsize="small")
    fig.colorbar(image, ax=left, label="log10 τ")
    counts = [int(a["distill"].sum()) for a in market.values()]
    totals = [len(a["distill"]) for a in market.values()]
    right.bar(list(market), totals, color="lightgrey", label="priced")
    right.bar(list(market), counts, color="tab:blue", label="distilling next round")
    right.set_xticks(list(market))
    right.set_xlabel("round")
    right.set_ylabel("clients")
    right.legend(fontsize="small")
    right.set_title("the gate's decisions", fontsize=9)
    close_figure(fig, path)


def plot_accuracy(rounds: dict[int, dict[str, np.ndarray]], path: Path) -> None:
    """Per-client personalized accuracy (evaluated rounds) and reference accuracy (market
    rounds): one thin line per client, the mean bold."""
    sources = [("eval_partition", "eval_personalized", "personalized test accuracy"),
               ("partition", "accuracy", "reference accuracy (market)")]
    present = [s for s in sources if any(s[1] in a for a in rounds.values())]
    fig, axes = figure((5.2 * len(present), 3.8), 1, len(present), squeeze=False)
    for ax, (index_key, value_key, title) in zip(axes[0], present):
        kept = {r: a for r, a in rounds.items() if value_key in a}
        clients = _clients(kept, index_key)
        table = _per_client(kept, clients, index_key, value_key)
        x = list(kept)
        for row in table:
            ax.plot(x, row, color="tab:blue", alpha=0.35, lw=0.8, marker="." if len(x) < 3 else None)
        ax.plot(x, np.nanmean(table, axis=0), color="black", lw=2.0, marker="o", label="mean")
        _accuracy_axes(ax, f"{title}, {len(clients)} clients")
    close_figure(fig, path)


def _accuracy_axes(ax: Any, title: str) -> None:
    """Labels, [0, 1] limits, grid and legend of an accuracy-per-round panel."""
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_tiers(rounds: dict[int, dict[str, np.ndarray]], tier_of: dict[int, str], tiers: list[str],
               path: Path) -> None:
    """Per tier (``tiers``, smallest first; ``tier_of``: partition -> tier), its clients'
    mean personalized and global accuracy in the evaluated rounds."""
    kept = {r: a for r, a in rounds.items() if "eval_personalized" in a}
    clients = _clients(kept, "eval_partition")
    fig, axes = figure((10.4, 3.8), 1, 2, squeeze=False)
    for ax, (key, title) in zip(axes[0], (("eval_personalized", "personalized"), ("eval_global", "global"))):
        table = _per_client(kept, clients, "eval_partition", key)
        for tier in tiers:
            rows = [i for i, c in enumerate(clients) if tier_of.get(c) == tier]
            if rows:
                ax.plot(list(kept), np.nanmean(table[rows], axis=0), marker="o",
                        label=f"{tier} (n={len(rows)})")
        _accuracy_axes(ax, f"{title} test accuracy per tier")
    close_figure(fig, path)


def _tiers(run_dir: Path, partitions: list[int]) -> tuple[dict[int, str], list[str]]:
    """Partition -> ``"tier: model"`` from the run's config (``results.json``), and the
    tiers smallest first; nothing for a run without a fleet."""
    results = run_dir / "results.json"
    if not results.is_file():
        return {}, []
    cfg = parse_run_config(stored_run_config(json.loads(results.read_text())["config"]))
    labels = [f"{tier}: {cfg.tier_model(index)}" for index, (tier, _) in enumerate(cfg.fleet_tiers)]
    return {p: labels[cfg.tier_of_partition(p)] for p in partitions} if labels else {}, labels


def plot_priors(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Each client's class prior in one market round."""
    fig, ax = figure((6, 3.8))
    image = ax.imshow(arrays["prior"], aspect="auto", cmap="Blues", vmin=0.0)
    if len(arrays["partition"]) <= 20:
        ax.set_yticks(range(len(arrays["partition"])), arrays["partition"], fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("client (partition)")
    fig.colorbar(image, ax=ax, label="predicted class share")
    close_figure(fig, path)


def inspect_run(run_dir: Path, panels: int = 4) -> dict[str, Any]:
    """Print the round lines and draw the plots into ``run_dir``; returns what was drawn.

    Raises:
        FileNotFoundError: ``run_dir`` has no round files.
    """
    rounds = read_rounds(run_dir)
    drawn = []
    if any("eval_personalized" in a or "accuracy" in a for a in rounds.values()):
        plot_accuracy(rounds, run_dir / "client_accuracy.png")
        drawn.append("client_accuracy.png")
        tier_of, tiers = _tiers(run_dir, _clients(rounds, "eval_partition"))
        if tier_of:
            plot_tiers(rounds, tier_of, tiers, run_dir / "tier_accuracy.png")
            drawn.append("tier_accuracy.png")
    market = [r for r, a in rounds.items() if "weight" in a]
    lines = round_lines(rounds)
    if market:
        plot_teachers(rounds, run_dir / "market_teachers.png", panels)
        plot_tau_gate(rounds, run_dir / "market_tau_gate.png")
        plot_priors(rounds[market[-1]], run_dir / "class_priors.png")
        drawn += ["market_teachers.png", "market_tau_gate.png", "class_priors.png"]
        print("\n".join(lines))
    else:
        print(f"[inspect] {run_dir}: no market in this run (evaluation only)")
    print(f"[inspect] wrote {', '.join(drawn)} in {run_dir}")
    return {"rounds": list(rounds), "market_rounds": market, "drawn": drawn, "lines": lines}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m kta_flwr.tools.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder (results.json, rounds/)")
    parser.add_argument("--panels", type=int, default=4, help="rounds shown in the teacher heatmap")
    args = parser.parse_args(argv)
    try:
        inspect_run(args.run_dir.expanduser(), args.panels)
    except FileNotFoundError as err:
        print(f"[inspect] {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
