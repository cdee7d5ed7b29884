"""The server's checkpoint of a run, written after every completed round, and what a
resumed run checks before it continues from it.

``<run dir>/server-state.json`` (with its arrays in ``server-state.<digest>.npz``,
:mod:`kta_flwr.storage.tree`: no pickle, so opening a planted file runs nothing) holds
the last completed round, the lineage (the id of the run that started the chain), the
run config, the strategy's state (:meth:`~kta_flwr.flower.strategies.base.NodeStrategy.state_dict`:
the market's bank and pending targets, the compressed baselines' model log, the stock
strategies' global model, the sampling RNG and which node holds which partition), the
results so far with the byte meter, and the process RNG states. A truncated, garbage or
foreign file is refused, naming the file and the reason.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kta_flwr.config import TRACKING_KEYS, ConfigError, RunConfig, stored_run_config
from kta_flwr.storage import StateFileError, read_state, write_state

STATE_FILE = "server-state.json"
#: The pickle of kta-flwr before 2026-12: never opened (a pickle runs code when loaded).
LEGACY_STATE_FILE = "server-state.pkl"
#: /3: the market's held-out rows are drawn each round (``target_draw``, ``last_draw``).
FORMAT = "kta-flwr-run-state/3"
#: Run-config keys a resumed run may change (how it waits and times out, where it reads
#: the state from, how many rounds it runs in all, the nodes' lifetime privacy budget,
#: where it is tracked).
MAY_CHANGE = ("resume-from", "output-dir", "num-server-rounds", "round-timeout",
              "node-wait-timeout", "min-round-nodes", "min-nodes", "device",
              "dp-lifetime-epsilon", *TRACKING_KEYS)
_FIELDS = {"round": int, "lineage": int, "config": dict, "strategy": dict, "recorder": dict,
           "random_state": tuple, "numpy_state": tuple}


@dataclass
class RunState:  # pylint: disable=too-many-instance-attributes
    """Everything a resumed run needs to continue after round ``round``."""

    round: int
    lineage: int
    config: dict[str, Any]
    strategy: dict[str, Any]
    recorder: dict[str, Any]  # rows, train metrics, elapsed seconds, the byte meter
    random_state: tuple[Any, ...]
    numpy_state: tuple[Any, ...]
    #: The server's global model under the market (``server-model``): weights and the
    #: banked consensus; empty without one (and in checkpoints written before it existed).
    server_model: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls, **fields: Any) -> RunState:
        """The state now, with the process RNGs (``random``, ``np.random``) read here."""
        return cls(random_state=random.getstate(), numpy_state=np.random.get_state(), **fields)

    def restore_rngs(self) -> None:
        """Put the process RNGs back where they were."""
        random.setstate(self.random_state)
        np.random.set_state(self.numpy_state)


def save_run_state(run_dir: Path, state: RunState) -> None:
    """Write ``state`` to ``run_dir/server-state.json`` (+ ``.npz``) atomically."""
    write_state(Path(run_dir) / STATE_FILE, vars(state), format_name=FORMAT)


def load_run_state(run_dir: Path) -> RunState:
    """The checkpoint of the run in ``run_dir`` (run-config ``resume-from``).

    Raises:
        ConfigError: no such folder or checkpoint, a legacy pickle (not opened), or a
            file that cannot be used (naming the file, and the field where one is wrong).
    """
    folder = Path(run_dir).expanduser()
    path = folder / STATE_FILE
    if not path.is_file():
        if (folder / LEGACY_STATE_FILE).is_file():
            raise ConfigError(
                f"run-config 'resume-from': {folder / LEGACY_STATE_FILE} is a pickle (kta-flwr "
                "before 2026-12) and is not opened: unpickling runs whatever code the file "
                f"holds. Only {STATE_FILE} checkpoints can be resumed; rerun that run")
        raise ConfigError(
            f"run-config 'resume-from' = {str(run_dir)!r}: no {STATE_FILE} there; pass the "
            "folder of a run (its results.json is next to it) that completed a round"
        )
    try:
        raw = read_state(path, format_name=FORMAT)
    except StateFileError as err:
        raise ConfigError(f"run-config 'resume-from': {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"run-config 'resume-from': {path}: the state is not a table")
    for name, kind in _FIELDS.items():
        if not isinstance(raw.get(name), kind) or (kind is int and isinstance(raw[name], bool)):
            raise ConfigError(f"run-config 'resume-from': {path}: field '{name}' is missing or "
                              f"not a {kind.__name__}")
    if raw["round"] < 1:
        raise ConfigError(f"run-config 'resume-from': {path}: field 'round' = {raw['round']} < 1")
    server_model = raw.get("server_model", {})
    if not isinstance(server_model, dict):
        raise ConfigError(f"run-config 'resume-from': {path}: field 'server_model' is not a dict")
    return RunState(**{name: raw[name] for name in _FIELDS}, server_model=server_model)


def check_resumable(saved: dict[str, Any], cfg: RunConfig, completed: int) -> None:
    """Refuse to resume with a config that would not continue the same run.

    Raises:
        ConfigError: naming the first key that differs (other than :data:`MAY_CHANGE`),
            or a ``num-server-rounds`` below the rounds already completed.
    """
    now = cfg.to_flwr()
    saved = stored_run_config(saved)  # a checkpoint older than a key ran without it
    for key in sorted(set(saved) | set(now)):
        if key not in MAY_CHANGE and saved.get(key) != now.get(key):
            raise ConfigError(
                f"run-config '{key}' = {now.get(key)!r} differs from the run being resumed "
                f"({saved.get(key)!r}); a resumed run keeps every key but {list(MAY_CHANGE)}"
            )
    if cfg.num_server_rounds < completed:
        raise ConfigError(
            f"run-config 'num-server-rounds' = {cfg.num_server_rounds} is below the "
            f"{completed} rounds the resumed run already completed"
        )
