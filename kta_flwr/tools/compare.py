"""Compare methods across settings from the benchmark harness's summaries.

::

    python -m kta_flwr.tools.compare --out results/market --default kta \\
        --against local,fedmd,ktpfl \\
        "CIFAR-10 α=0.5=results/market/alpha0.5/cifar10_simplecnn" \\
        "CIFAR-10 α=0.1=results/market/alpha0.1/cifar10_simplecnn" \\
        "FEMNIST=results/market/femnist/femnist"

reads each setting's ``summary.json`` (written by :mod:`kta_flwr.tools.bench`), and writes to
``--out``:

- ``comparison.md``: one row per method, per setting its mean ± std final personalized
  accuracy, global accuracy (and the server model's, where it has one) and total MiB, and the mean personalized accuracy over the
  settings; then, per setting, the verdict on ``--default`` against the best of
  ``--against`` (within ``--margin`` of it, in accuracy points);
- ``comparison.json``: the same numbers;
- ``comparison.png``: mean personalized accuracy per setting and method (bars, std as
  error bars).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kta_flwr.tools.plots import colours, figure, save_figure


@dataclass(frozen=True)
class Cell:
    """One method in one setting: mean and std over seeds."""

    personalized: tuple[float, float]
    global_: tuple[float, float]
    mib: tuple[float, float]
    seeds: int
    per_seed: dict[int, float]  # final personalized accuracy per seed
    #: The market's server-side global model (``server-model``); NaN without one.
    server_global: tuple[float, float] = (math.nan, math.nan)


@dataclass(frozen=True)
class Verdict:
    """``default`` against the best of the reference methods in one setting (points)."""

    setting: str
    default: float
    best_method: str
    best: float
    gap_points: float  # default - best, in accuracy points
    within_margin: bool
    paired_gaps: list[float]  # default - best per shared seed, in points


def load_setting(folder: Path) -> dict[str, Cell]:
    """Per method, its :class:`Cell` from ``folder/summary.json``."""
    path = folder / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"no summary.json in {folder}: run kta_flwr.tools.bench there first")
    summary = json.loads(path.read_text())
    per_seed: dict[str, dict[int, float]] = {}
    for run in summary.get("runs", []):
        per_seed.setdefault(run["method"], {})[int(run["seed"])] = run["final_personalized"]
    return {
        name: Cell(tuple(s["personalized"]), tuple(s["global"]), tuple(s["mib_total"]),
                   len(s["seeds"]), per_seed.get(name, {}),
                   tuple(s.get("server_global", (math.nan, math.nan))))
        for name, s in summary["methods"].items()
    }


def verdicts(
    table: dict[str, dict[str, Cell]], default: str, against: list[str], margin: float
) -> list[Verdict]:
    """Per setting (``table[setting][method]``), ``default``'s mean personalized accuracy
    against the best of ``against`` present there; ``margin`` in accuracy points."""
    out = []
    for setting, cells in table.items():
        present = [m for m in against if m in cells]
        if default not in cells or not present:
            continue
        best = max(present, key=lambda m: cells[m].personalized[0])
        gap = 100.0 * (cells[default].personalized[0] - cells[best].personalized[0])
        mine, theirs = cells[default].per_seed, cells[best].per_seed
        paired = [100.0 * (mine[s] - theirs[s]) for s in sorted(set(mine) & set(theirs))]
        out.append(Verdict(setting, cells[default].personalized[0], best,
                           cells[best].personalized[0], gap, gap >= -margin, paired))
    return out


def mean_over_settings(table: dict[str, dict[str, Cell]], method: str) -> float:
    """Mean personalized accuracy of ``method`` over the settings (NaN if one lacks it)."""
    values = [cells[method].personalized[0] for cells in table.values() if method in cells]
    return statistics.fmean(values) if len(values) == len(table) else math.nan


def markdown(table: dict[str, dict[str, Cell]], found: list[Verdict], default: str,
             against: list[str], margin: float) -> str:
    """The comparison table and the verdicts."""
    settings = list(table)
    methods = list(dict.fromkeys(m for cells in table.values() for m in cells))
    head = "| method | " + " | ".join(f"{s}: pers. / global / MiB" for s in settings) + " | mean pers. |"
    lines = [head, "|---" * (len(settings) + 2) + "|"]
    for method in methods:
        row = []
        for setting in settings:
            cell = table[setting].get(method)
            server = "" if cell is None or math.isnan(cell.server_global[0]) else (
                f" (server model {cell.server_global[0]:.4f})")
            row.append("—" if cell is None else
                       f"{cell.personalized[0]:.4f} ± {cell.personalized[1]:.4f} / "
                       f"{cell.global_[0]:.4f}{server} / {cell.mib[0]:.2f}")
        mean = mean_over_settings(table, method)
        lines.append(f"| {method} | " + " | ".join(row) + f" | {'—' if math.isnan(mean) else f'{mean:.4f}'} |")
    lines += ["", f"`{default}` against the best of {{{', '.join(against)}}} (mean personalized "
              f"accuracy; goal: within {margin:g} point of the best in each setting, and the best "
              "on average):", ""]
    for v in found:
        mark = "yes" if v.within_margin else "**no**"
        seeds = ", ".join(f"{g:+.1f}" for g in v.paired_gaps)
        lines.append(f"- {v.setting}: {v.default:.4f} vs {v.best_method} {v.best:.4f} "
                     f"({v.gap_points:+.2f} pt; per seed {seeds or '—'}) — within {margin:g} pt: {mark}")
    means = {m: mean_over_settings(table, m) for m in [default, *against]}
    known = {m: v for m, v in means.items() if not math.isnan(v)}
    if default in known and len(known) > 1:
        best = max(known, key=known.get)
        lines.append(f"- average over the settings: {default} {known[default]:.4f}; best "
                     f"{best} {known[best]:.4f} — {default} best on average: "
                     f"{'yes' if best == default else '**no**'}")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, Cell]], path: Path) -> None:
    """Grouped bars: mean personalized accuracy per setting (groups) and method (bars)."""
    settings = list(table)
    methods = list(dict.fromkeys(m for cells in table.values() for m in cells))
    fig, ax = figure((max(8.5, 2.5 + 0.4 * len(methods) * len(settings)), 4.5))
    width = 0.8 / len(methods)
    for i, (colour, method) in enumerate(zip(colours(len(methods)), methods)):
        xs = [s + (i - (len(methods) - 1) / 2) * width for s in range(len(settings))
              if method in table[settings[s]]]
        cells = [table[s][method] for s in settings if method in table[s]]
        ax.bar(xs, [c.personalized[0] for c in cells], width, yerr=[c.personalized[1] for c in cells],
               label=method, color=colour, capsize=2)
    ax.set_xticks(range(len(settings)), settings)
    ax.set_ylabel("final mean personalized test accuracy")
    ax.set_title("Methods across settings (mean ± std over seeds)")
    save_figure(fig, ax, path, legend_beside=True)


def main(argv: list[str] | None = None) -> int:
    """CLI; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", help="NAME=FOLDER (a bench output folder)")
    parser.add_argument("--default", default="kta")
    parser.add_argument("--against", default="local,fedmd,ktpfl")
    parser.add_argument("--margin", type=float, default=1.0, help="accuracy points")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    table: dict[str, dict[str, Cell]] = {}
    for item in args.settings:
        name, sep, folder = item.rpartition("=")
        if not sep or not name:
            print(f"error: setting {item!r} is not NAME=FOLDER", file=sys.stderr)
            return 2
        try:
            table[name] = load_setting(Path(folder))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    against = [m.strip() for m in args.against.split(",") if m.strip()]
    found = verdicts(table, args.default, against, args.margin)
    text = markdown(table, found, args.default, against, args.margin)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(text)
    payload: dict[str, Any] = {
        "settings": {s: {m: asdict(c) for m, c in cells.items()} for s, cells in table.items()},
        "verdicts": [asdict(v) for v in found],
        "default": args.default, "against": against, "margin_points": args.margin,
    }
    (args.out / "comparison.json").write_text(json.dumps(payload, indent=2))
    plot(table, args.out / "comparison.png")
    print(f"[compare] wrote {args.out}/comparison.md, comparison.json, comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
