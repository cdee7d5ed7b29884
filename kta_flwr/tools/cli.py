"""What the benchmark CLIs share: their common arguments, the data root, the exit codes."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kta_flwr.config import ConfigError
from kta_flwr.tools.presets import parse_override


def benchmark_parser(prog: str, description: str | None, set_help: str) -> argparse.ArgumentParser:
    """A parser with ``--preset``, ``--clients``, ``--set`` (help ``set_help``) and the
    federation arguments ``--engine``, ``--data-root``, ``--out``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="configs/<name>.toml or a TOML path")
    parser.add_argument("--clients", type=int, default=10, help="simulated SuperNodes")
    # extend: ``--set a=1 --set b=2`` keeps both (a second --set used to replace the first)
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--engine", choices=("simulation", "deployment"), default="simulation")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder that relative data-path values are taken from "
                        "(default: $KTA_DATASETS or ~/kta-flwr/data)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    return parser


def overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` as run-config overrides (values parsed as TOML)."""
    return dict(parse_override(item) for item in items)


def data_root_from(args: argparse.Namespace) -> Path | None:
    """``--data-root``, else ``$KTA_DATASETS``, else None (the config's default root)."""
    if args.data_root:
        return Path(args.data_root)
    return Path(os.environ["KTA_DATASETS"]) if "KTA_DATASETS" in os.environ else None


def run_benchmark_cli(
    parser: argparse.ArgumentParser, argv: list[str] | None,
    work: Callable[[argparse.Namespace, Path | None], object],
) -> int:
    """Parse ``argv``, turn SIGTERM into SystemExit (so a federation's processes are
    cleaned up on ``kill``), run ``work(args, data_root)``.

    Returns:
        0 when it completes, 2 (with the message on stderr) on a :class:`ConfigError`.
    """
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        work(args, data_root_from(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
