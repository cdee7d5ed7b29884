"""The server's checkpoint of a run, written after every completed round, and what a
resumed run checks before it continues from it.

``<run dir>/server-state.pkl`` (pickle, written atomically) holds the last completed
round, the lineage (the id of the run that started the chain), the run config, the
strategy's state (:meth:`~kta_flwr.flower.strategies.base.NodeStrategy.state_dict`: the
market's bank and pending targets, the compressed baselines' model log, sampling RNG),
the global model's arrays (stock strategies), the byte meter, the results rows and the
process RNG states. Only load files you wrote: pickle runs code from the file.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kta_flwr.config import ConfigError, RunConfig
from kta_flwr.storage import write_bytes_atomic

STATE_FILE = "server-state.pkl"
FORMAT = "kta-flwr-run-state/1"
#: Run-config keys a resumed run may change (how it waits and times out, where it reads
#: the state from, how many rounds it runs in all).
MAY_CHANGE = ("resume-from", "output-dir", "num-server-rounds", "round-timeout",
              "node-wait-timeout", "min-round-nodes", "min-nodes", "device")


@dataclass
class RunState:  # pylint: disable=too-many-instance-attributes
    """Everything a resumed run needs to continue after round ``round``."""

    round: int
    lineage: int
    config: dict[str, Any]
    strategy: dict[str, Any]
    arrays: dict[str, np.ndarray]
    recorder: dict[str, Any]  # rows, train metrics, elapsed seconds, the byte meter
    random_state: Any
    numpy_state: Any

    @classmethod
    def capture(cls, **fields: Any) -> RunState:
        """The state now, with the process RNGs (``random``, ``np.random``) read here."""
        return cls(random_state=random.getstate(), numpy_state=np.random.get_state(), **fields)

    def restore_rngs(self) -> None:
        """Put the process RNGs back where they were."""
        random.setstate(self.random_state)
        np.random.set_state(self.numpy_state)


def save_run_state(run_dir: Path, state: RunState) -> None:
    """Write ``state`` to ``run_dir/server-state.pkl`` atomically."""
    blob = pickle.dumps({"format": FORMAT, "state": state}, protocol=pickle.HIGHEST_PROTOCOL)
    write_bytes_atomic(Path(run_dir) / STATE_FILE, blob)


def load_run_state(run_dir: Path) -> RunState:
    """The checkpoint of the run in ``run_dir`` (run-config ``resume-from``).

    Raises:
        ConfigError: no such folder or checkpoint, or not one of this format.
    """
    path = Path(run_dir).expanduser() / STATE_FILE
    if not path.is_file():
        raise ConfigError(
            f"run-config 'resume-from' = {str(run_dir)!r}: no {STATE_FILE} there; pass the "
            "folder of a run (its results.json is next to it) that completed a round"
        )
    try:
        blob = pickle.loads(path.read_bytes())  # noqa: S301  # our own file, see module doc
    except Exception as err:  # pylint: disable=broad-except
        raise ConfigError(f"run-config 'resume-from': {path} cannot be read ({err})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(f"run-config 'resume-from': {path} is not a {FORMAT} checkpoint")
    return blob["state"]


def check_resumable(saved: dict[str, Any], cfg: RunConfig, completed: int) -> None:
    """Refuse to resume with a config that would not continue the same run.

    Raises:
        ConfigError: naming the first key that differs (other than :data:`MAY_CHANGE`),
            or a ``num-server-rounds`` below the rounds already completed.
    """
    now = cfg.to_flwr()
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
