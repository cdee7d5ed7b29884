"""Run-config values on the command line: presets (``configs/<name>.toml``), overrides,
and the ``key=value`` strings ``flwr run --run-config``/``--node-config`` parse.

``flwr run`` accepts either one TOML file or ``key=value`` pairs, not both, so shortened
or adjusted runs of a preset go through this module::

    flwr run . --stream --federation-config "num-supernodes=4" \\
        --run-config "$(python -m kta_flwr.tools.presets cifar10_simplecnn num-server-rounds=1)"

prints the preset with the overrides applied as one line of ``key=value`` pairs, after
checking every value with :func:`kta_flwr.config.parse_run_config`.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.tools.paths import CONFIGS_DIR

#: Where the presets live: ``configs/`` next to ``pyproject.toml``.
PRESET_DIR = CONFIGS_DIR


def preset_path(name: str) -> Path:
    """``name`` as a path if it is a file, else ``configs/<name>.toml``."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
        raise ConfigError(f"unknown preset {name!r}; available: {known}")
    return path


def load_preset(name: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The preset ``name`` with ``overrides`` (kebab-case keys) on top of the defaults."""
    with preset_path(name).open("rb") as fh:
        values = tomllib.load(fh)
    values.update(overrides or {})
    return parse_run_config({**RunConfig().to_flwr(), **values})


def toml_value(value: Any) -> str:
    """Render a Python scalar as a TOML value (for ``--run-config``/``--node-config``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_arg(values: dict[str, Any]) -> str:
    """``{"a": 1, "b": "x"}`` -> ``'a=1 b="x"'``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def to_flwr_args(cfg: RunConfig) -> str:
    """``cfg`` as the ``key=value ...`` string ``flwr run --run-config`` parses."""
    return config_arg(cfg.to_flwr())


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value parsed as TOML (else a bare string).

    Raises:
        ConfigError: ``item`` has no ``=``.
    """
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} is not key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip(), value


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m kta_flwr.tools.presets NAME [key=value ...]``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        print("presets:", ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml"))))
        return 0 if args else 2
    try:
        cfg = load_preset(args[0], dict(parse_override(a) for a in args[1:]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_flwr_args(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
