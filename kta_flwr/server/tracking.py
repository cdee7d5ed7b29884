"""Experiment tracking: each run's config, per-round metrics and bytes, the market's
decisions and the files it keeps, in MLflow (``docs/running.md#experiment-tracking``).

One interface, :class:`RunTracker`, with two implementations chosen by
:func:`tracker_for` from the run config's ``tracking`` key: :class:`NoTracking` and
:class:`MlflowTracker`. The MLflow tracker works on a background thread at the lowest CPU
priority: the store is opened (and, the first time, created) while the first round
trains, on cycles the clients leave idle, and a slow or broken store never slows or stops
a round; what it could not log is named in one warning. With
``tracking-uri`` empty the store is local, next to the results:
``sqlite:///<output-dir>/mlflow.db`` with artifacts in ``<output-dir>/mlartifacts``, so
``mlflow ui --backend-store-uri sqlite:///<output-dir>/mlflow.db`` shows the runs side
by side. A resumed run continues its MLflow run (its id is kept in the run folder's
``tracking.json``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.common import log

from kta_flwr.config import TRACKING_MLFLOW, TRACKING_NONE, ConfigError, RunConfig
from kta_flwr.flower.results import round_metrics
from kta_flwr.storage import write_text_atomic

#: The run folder's record of its MLflow run (tracking URI, experiment and run ids).
TRACKING_FILE = "tracking.json"
#: What a run keeps that is logged as artifacts, when present in the run folder.
ARTIFACTS = ("results.json", "rounds.csv", "global-model.pt", "rounds")
#: How long the end of a run waits for the tracker to finish writing, in seconds.
FINISH_TIMEOUT_S = 300.0
#: MLflow accepts at most this many params in one batch.
_PARAMS_PER_BATCH = 100

#: A metric as logged: (key, value, timestamp in ms, step = server round).
Metric = tuple[str, float, int, int]


class RunTracker(Protocol):
    """Where a run reports what it did, besides its own files."""

    def start(self, run_dir: Path, cfg: RunConfig, tags: Mapping[str, str]) -> None:
        """Open (or, for a resumed run, reopen) the run's record."""

    def log_round(self, server_round: int, row: Mapping[str, Any],
                  decisions: Mapping[str, np.ndarray]) -> None:
        """Round ``server_round``'s results row and the strategy's decisions."""

    def finish(self, run_dir: Path, failed: bool = False) -> None:
        """Log the run folder's files, close the record and wait for the writes."""


class NoTracking:
    """``tracking = "none"`` (or MLflow absent under ``auto``): the run's own files only."""

    def start(self, run_dir: Path, cfg: RunConfig, tags: Mapping[str, str]) -> None:
        """Nothing to open."""

    def log_round(self, server_round: int, row: Mapping[str, Any],
                  decisions: Mapping[str, np.ndarray]) -> None:
        """Nothing to log."""

    def finish(self, run_dir: Path, failed: bool = False) -> None:
        """Nothing to close."""


def mlflow_installed() -> bool:
    """Whether MLflow (``mlflow`` or ``mlflow-skinny``) can be imported."""
    return importlib.util.find_spec("mlflow") is not None


def tracker_for(cfg: RunConfig) -> RunTracker:
    """The tracker ``cfg.tracking`` names.

    Raises:
        ConfigError: ``tracking = "mlflow"`` without MLflow installed.
    """
    if cfg.tracking == TRACKING_NONE:
        return NoTracking()
    if not mlflow_installed():
        if cfg.tracking == TRACKING_MLFLOW:
            raise ConfigError(
                "run-config 'tracking' = 'mlflow' needs MLflow, which is not installed "
                "where the ServerApp runs: pip install 'kta-flwr[tracking]' (or set "
                "tracking = 'none')")
        log(INFO, "kta-flwr: experiment tracking off (MLflow is not installed: "
            "pip install 'kta-flwr[tracking]')")
        return NoTracking()
    return MlflowTracker(cfg.tracking_uri or local_store_uri(cfg.resolved_output_dir()),
                         cfg.tracking_experiment)


def local_store_uri(output_dir: Path) -> str:
    """The default tracking URI: an SQLite store in ``output_dir``."""
    return f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"


class MlflowTracker:
    """Logs to MLflow from a background thread (see the module docstring)."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self._jobs: queue.Queue[Callable[[Any, str], None] | None] = queue.Queue()
        self._failures: list[str] = []
        self._thread: threading.Thread | None = None

    # --- the run's side ---------------------------------------------------------------
    def start(self, run_dir: Path, cfg: RunConfig, tags: Mapping[str, str]) -> None:
        """Start the writer thread; it opens the store and creates (or reopens) the run."""
        if self._thread is not None:
            return
        opened = _read_tracking_file(Path(run_dir), self.tracking_uri)
        params = {key: str(value) for key, value in sorted(cfg.to_flwr().items())}
        self._thread = threading.Thread(
            target=self._work, args=(Path(run_dir), opened, params, dict(tags)),
            name="kta-flwr-mlflow", daemon=True)
        self._thread.start()

    def log_round(self, server_round: int, row: Mapping[str, Any],
                  decisions: Mapping[str, np.ndarray]) -> None:
        """Queue round ``server_round``'s metrics (computed now, logged by the thread)."""
        stamp = int(time.time() * 1000)
        metrics = [(key, value, stamp, server_round)
                   for key, value in round_metrics(row, decisions).items()]
        self._jobs.put(lambda client, run_id: _log_metrics(client, run_id, metrics))

    def finish(self, run_dir: Path, failed: bool = False) -> None:
        """Queue the artifacts and the run's end; wait up to :data:`FINISH_TIMEOUT_S`."""
        if self._thread is None:
            return
        paths = [Path(run_dir) / name for name in ARTIFACTS] + sorted(Path(run_dir).glob("*.png"))
        status = "FAILED" if failed else "FINISHED"

        def close(client: Any, run_id: str) -> None:
            for path in paths:
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), artifact_path=path.name)
                elif path.is_file():
                    client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, status=status)

        self._jobs.put(close)
        self._jobs.put(None)
        self._thread.join(FINISH_TIMEOUT_S)
        if self._thread.is_alive():
            self._failures.append(f"still writing after {FINISH_TIMEOUT_S:.0f} s; left behind")
        if self._failures:
            log(WARNING, "kta-flwr: MLflow tracking (%s) incomplete: %s", self.tracking_uri,
                "; ".join(self._failures[:5]))
        self._thread = None

    # --- the writer thread ------------------------------------------------------------
    def _work(self, run_dir: Path, opened: str | None, params: dict[str, str],
              tags: dict[str, str]) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: this thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            client, run_id = self._open(run_dir, opened, params, tags)
        except Exception as err:  # pylint: disable=broad-exception-caught
            # any failure of the store (URI, server, disk) must not touch the run
            self._failures.append(f"could not open the run: {type(err).__name__}: {err}")
            client = run_id = None
        while (job := self._jobs.get()) is not None:
            if client is None:
                continue
            try:
                job(client, run_id)
            except Exception as err:  # pylint: disable=broad-exception-caught
                self._failures.append(f"{type(err).__name__}: {err}")

    def _open(self, run_dir: Path, opened: str | None, params: dict[str, str],
              tags: dict[str, str]) -> tuple[Any, str]:
        """The client and the id of this run's MLflow run (``opened``: a resumed run's)."""
        # pylint: disable=import-outside-toplevel
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        if opened is not None:
            client.update_run(opened, status="RUNNING")
            client.set_tag(opened, "kta.resumed", "true")
            return client, opened
        experiment_id = _experiment_id(client, self.experiment, self.tracking_uri)
        run = client.create_run(experiment_id, run_name=run_dir.name,
                                tags={**tags, "kta.run_dir": str(run_dir)})
        run_id = run.info.run_id
        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[start:start + _PARAMS_PER_BATCH])
        write_text_atomic(run_dir / TRACKING_FILE, json.dumps(
            {"tracking_uri": self.tracking_uri, "experiment_id": experiment_id,
             "run_id": run_id}, indent=1))
        return client, run_id


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created if new (local store: artifacts in
    ``mlartifacts`` beside the database)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except Exception:  # pylint: disable=broad-exception-caught
        found = client.get_experiment_by_name(name)  # created by a concurrent run meanwhile
        if found is None:
            raise
        return str(found.experiment_id)


def _read_tracking_file(run_dir: Path, tracking_uri: str) -> str | None:
    """The MLflow run id a resumed run's folder records for ``tracking_uri`` (None: new)."""
    try:
        saved = json.loads((run_dir / TRACKING_FILE).read_text(encoding="utf-8"))
        return str(saved["run_id"]) if saved["tracking_uri"] == tracking_uri else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _log_metrics(client: Any, run_id: str, metrics: list[Metric]) -> None:
    from mlflow.entities import Metric as MlflowMetric  # pylint: disable=import-outside-toplevel

    client.log_batch(run_id, metrics=[MlflowMetric(key, value, stamp, step)
                                      for key, value, stamp, step in metrics])
