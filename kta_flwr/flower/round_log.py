"""What each round decided, kept in the run folder to look at afterwards
(``python -m kta_flwr.tools.inspect <run dir>``): one compressed ``.npz`` per round,
``<run dir>/rounds/round-0003.npz``, written atomically.

Arrays of the market (kta, fedmd, ktpfl; K = the clients the market priced, in partition
order, C classes, m = min(K, :data:`TOP_TEACHERS`)):

- ``partition`` [K] int64: each client's partition id (-1 if unknown);
- ``uploaded`` [K] bool: its logits are from this round (else banked from an earlier one);
- ``accuracy`` [K]: its reference accuracy as the market judged it;
- ``tau`` [K]: its similarity temperature (inf: FedMD's uniform weights; nan: KT-pFL's);
- ``distill`` [K] bool: it receives targets next round (False: the gate kept them back);
- ``teacher`` [K, m] int64 and ``weight`` [K, m] float32: its m largest teacher weights
  (indices into ``partition``), largest first; every weight when K ≤ m;
- ``prior`` [K, C] float32: its class prior (mean predicted distribution);
- ``bytes_up`` [K] int64: payload bytes of its upload this round (0 when banked);
- ``bytes_down`` [K] int64: payload bytes of the targets it receives next round;
- ``scored_rows`` [H] int64: the reference rows of this round's subset held out (where
  the market scored its teachers; drawn after the uploads, ``protocol.scoring_draw``),
  ascending.

Arrays of the evaluation (every strategy, in rounds with an evaluation; E clients):
``eval_partition`` [E] int64, ``eval_personalized`` [E], ``eval_global`` [E].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kta_flwr.maths.market import MarketOutput
from kta_flwr.storage import atomic_path

#: Teachers kept per client (a 1,000-client round stays a few MiB).
TOP_TEACHERS = 64
#: The folder of the round files inside a run folder.
FOLDER = "rounds"


def market_arrays(  # pylint: disable=too-many-arguments
    out: MarketOutput, partitions: Sequence[int], uploaded: Sequence[bool],
    bytes_up: Sequence[int], bytes_down: Sequence[int], top: int = TOP_TEACHERS,
    scored_rows: Sequence[int] = (),
) -> dict[str, np.ndarray]:
    """The market's decisions of one round as the arrays above (``out`` from
    :func:`kta_flwr.maths.market.run_market` over the K clients of ``partitions``;
    ``scored_rows``: reference row indices)."""
    weights = np.asarray(out.weights)
    m = min(top, weights.shape[1])
    teacher = np.argsort(-weights, axis=1, kind="stable")[:, :m]
    return {
        "partition": np.asarray(partitions, np.int64),
        "uploaded": np.asarray(uploaded, bool),
        "accuracy": np.asarray(out.accuracy, np.float64),
        "tau": np.asarray(out.tau, np.float64),
        "distill": np.asarray(out.distill, bool),
        "teacher": teacher.astype(np.int64),
        "weight": np.take_along_axis(weights, teacher, axis=1).astype(np.float32),
        "prior": np.asarray(out.priors, np.float32),
        "bytes_up": np.asarray(bytes_up, np.int64),
        "bytes_down": np.asarray(bytes_down, np.int64),
        "scored_rows": np.sort(np.asarray(scored_rows, np.int64)),
    }


def evaluation_arrays(clients: Sequence[Mapping[str, float]]) -> dict[str, np.ndarray]:
    """Each evaluated client's partition and accuracies (none: no arrays)."""
    mine = [c for c in clients if "partition-id" in c]
    if not mine:
        return {}
    return {
        "eval_partition": np.asarray([c["partition-id"] for c in mine], np.int64),
        "eval_personalized": np.asarray([c.get("personalized-accuracy", np.nan) for c in mine]),
        "eval_global": np.asarray([c.get("global-accuracy", np.nan) for c in mine]),
    }


def round_file(run_dir: Path, server_round: int) -> Path:
    """``<run_dir>/rounds/round-<round, 4 digits>.npz``."""
    return Path(run_dir) / FOLDER / f"round-{server_round:04d}.npz"


def write_round(run_dir: Path, server_round: int, arrays: Mapping[str, np.ndarray]) -> Path | None:
    """Write one round's arrays (atomically); nothing when there are none."""
    if not arrays:
        return None
    path = round_file(run_dir, server_round)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def read_rounds(run_dir: Path) -> dict[int, dict[str, np.ndarray]]:
    """Every round file of a run folder: round -> its arrays (sorted by round).

    Raises:
        FileNotFoundError: the folder has no round files (naming the folder).
    """
    files = sorted((Path(run_dir) / FOLDER).glob("round-*.npz"))
    if not files:
        raise FileNotFoundError(f"no round files in {Path(run_dir) / FOLDER}: is {run_dir} a "
                                "run folder of this version (results.json, rounds/)?")
    out = {}
    for path in files:
        with np.load(path) as data:
            out[int(path.stem.split("-")[1])] = {key: data[key] for key in data.files}
    return out


def dense_weights(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[K, K]`` teacher weights of one round (zeros beyond the kept top teachers)."""
    teacher, weight = arrays["teacher"], arrays["weight"]
    dense = np.zeros((len(teacher), len(arrays["partition"])), np.float32)
    np.put_along_axis(dense, teacher, weight, axis=1)
    return dense
