"""Per-round progress lines and the results files of a run.

:class:`RunRecorder` plugs into ``Strategy.start`` through two hooks every strategy
(stock or ours) already has: ``evaluate_metrics_aggr_fn`` (sees each client's evaluation
metrics) and ``evaluate_fn`` (called once at the end of each round). At the end it writes
``<output-dir>/<timestamp>-<strategy>/results.json`` and ``rounds.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from datetime import datetime
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from kta_flwr.config import RunConfig
from kta_flwr.flower.metering import DOWN, UP, ByteMeter, Traffic
from kta_flwr.flower.timing import EVALUATE_PHASES, PREFIX, TRAIN_PHASES

MIB = 1024 * 1024
PERSONALIZED = "personalized-accuracy"
GLOBAL = "global-accuracy"
SAMPLES = "samples"


def _mib(num_bytes: int) -> float:
    return num_bytes / MIB


def _traffic_row(traffic: Traffic, prefix: str) -> dict[str, float]:
    """Train-phase payload bytes (the headline) plus evaluate-phase and wire bytes."""
    return {
        f"{prefix}bytes_up": traffic.total(UP, "train"),
        f"{prefix}bytes_down": traffic.total(DOWN, "train"),
        f"{prefix}eval_bytes_down": traffic.total(DOWN, "evaluate"),
        f"{prefix}wire_bytes_up": traffic.total(UP, unit="wire"),
        f"{prefix}wire_bytes_down": traffic.total(DOWN, unit="wire"),
    }


def _client_metrics(records: list[RecordDict]) -> list[dict[str, float]]:
    """The numeric metrics of each reply (its first MetricRecord)."""
    return [
        {k: float(v) for k, v in rec.metric_records[next(iter(rec.metric_records))].items()
         if isinstance(v, (int, float))}
        for rec in records
    ]


def _sums(clients: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    return {key: float(sum(c.get(key, 0.0) for c in clients)) for key in keys}


def _phase_seconds(clients: list[dict[str, float]], phases: tuple[str, ...], column: str) -> dict[str, float]:
    """``{"<column><phase>": seconds summed over clients}`` from their ``t-<phase>`` metrics."""
    return {column + phase: sum(c.get(PREFIX + phase, 0.0) for c in clients) for phase in phases}


class RunRecorder:
    """Collects per-round metrics, byte counts and client time; prints a line per round.

    Each row also carries ``samples`` (samples trained on, summed over clients) and the
    client seconds per phase summed over clients (``train_s_<phase>``, ``eval_s_<phase>``,
    see :mod:`kta_flwr.flower.timing`).
    """

    def __init__(self, cfg: RunConfig, meter: ByteMeter, run_id: int | None = None) -> None:
        self.cfg = cfg
        self.meter = meter
        self.run_id = run_id
        self.rows: list[dict[str, Any]] = []
        self.clients_last_round: list[dict[str, float]] = []
        self._clients: list[dict[str, float]] = []
        self._trained: list[dict[str, float]] = []
        self._started = time.monotonic()
        #: Unix time at which the recorder (the ServerApp's main) started.
        self.started_at = time.time()

    # Hook: train_metrics_aggr_fn ----------------------------------------------------
    def aggregate_train(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """Flower's weighted mean of the train metrics, but sums of samples and seconds."""
        self._trained = _client_metrics(records)
        out = aggregate_metricrecords(records, weighting_key)
        keys = [SAMPLES] + [PREFIX + phase for phase in TRAIN_PHASES]
        out.update({k: v for k, v in _sums(self._trained, keys).items() if k in out})
        return out

    # Hook: evaluate_metrics_aggr_fn -------------------------------------------------
    def aggregate_evaluate(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """Unweighted mean over clients of each client's evaluation metrics."""
        del weighting_key  # every client counts once: mean personalized accuracy
        self._clients = _client_metrics(records)
        keys = sorted(set.intersection(*(set(c) for c in self._clients)))
        return MetricRecord({k: float(np.mean([c[k] for c in self._clients])) for k in keys})

    # Hook: evaluate_fn ----------------------------------------------------------------
    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Close round ``server_round``: one row, one log line."""
        del arrays
        if server_round == 0:  # called once before the first round
            return None
        traffic = self.meter.close_round()
        clients, self._clients = self._clients, []
        trained, self._trained = self._trained, []
        seconds = {**_phase_seconds(trained, TRAIN_PHASES, "train_s_"),
                   **_phase_seconds(clients, EVALUATE_PHASES, "eval_s_")}
        row: dict[str, Any] = {
            "strategy": self.cfg.strategy,
            "round": server_round,
            PERSONALIZED: _mean(clients, PERSONALIZED),
            GLOBAL: _mean(clients, GLOBAL),
            "clients_evaluated": len(clients),
            "messages": traffic.sent,
            "failed": traffic.failed,
            **_traffic_row(traffic, ""),
            **_traffic_row(self.meter.cumulative, "cum_"),
            SAMPLES: int(sum(c.get(SAMPLES, 0.0) for c in trained)),
            **{k: round(v, 4) for k, v in seconds.items()},
            "seconds": round(time.monotonic() - self._started, 3),
        }
        self.rows.append(row)
        self.clients_last_round = clients
        log(
            INFO,
            "[%s] round %d/%d | pers-acc %.4f | global-acc %.4f | clients %d, failed %d | "
            "MiB up %.4f down %.4f | cum MiB up %.4f down %.4f total %.4f | %.1f s",
            self.cfg.strategy, server_round, self.cfg.num_server_rounds,
            row[PERSONALIZED], row[GLOBAL], len(clients), traffic.failed,
            _mib(row["bytes_up"]), _mib(row["bytes_down"]),
            _mib(row["cum_bytes_up"]), _mib(row["cum_bytes_down"]),
            _mib(row["cum_bytes_up"] + row["cum_bytes_down"]), row["seconds"],
        )
        return MetricRecord(
            {
                PERSONALIZED: row[PERSONALIZED],
                GLOBAL: row[GLOBAL],
                "cum-mib": _mib(row["cum_bytes_up"] + row["cum_bytes_down"]),
            }
        )

    # Output -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Totals and final metrics of the run."""
        cum = self.meter.cumulative
        up, down = cum.total(UP, "train"), cum.total(DOWN, "train")
        last = self.rows[-1] if self.rows else {}
        return {
            "final_personalized_accuracy": last.get(PERSONALIZED, math.nan),
            "final_global_accuracy": last.get(GLOBAL, math.nan),
            "rounds_completed": len(self.rows),
            "bytes_up": up,
            "bytes_down": down,
            "bytes_total": up + down,
            "mib_total": _mib(up + down),
            "eval_bytes_down": cum.total(DOWN, "evaluate"),
            "eval_bytes_up": cum.total(UP, "evaluate"),
            "wire_bytes_total": cum.total(UP, unit="wire") + cum.total(DOWN, unit="wire"),
            "bytes_per_node": {str(k): v for k, v in sorted(cum.per_node.items())},
            "wire_manifest": dict(sorted(cum.manifest.items())),
            "samples": int(sum(row[SAMPLES] for row in self.rows)),
            "seconds": round(time.monotonic() - self._started, 3),
            "started_at": self.started_at,
            "finished_at": time.time(),
        }

    def write(self, extra: dict[str, Any] | None = None) -> Path:
        """Write ``results.json`` and ``rounds.csv``; return the run directory."""
        root = self.cfg.resolved_output_dir()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = root / f"{stamp}-{self.cfg.strategy}"
        if run_dir.exists():
            run_dir = root / f"{stamp}-{self.cfg.strategy}-{self.run_id or time.time_ns()}"
        run_dir.mkdir(parents=True, exist_ok=False)
        payload = {
            "run_id": self.run_id,
            "config": self.cfg.to_flwr(),
            "summary": self.summary(),
            "rounds": self.rows,
            "clients_last_round": self.clients_last_round,
            **(extra or {}),
        }
        (run_dir / "results.json").write_text(json.dumps(payload, indent=2, default=_jsonable))
        if self.rows:
            with (run_dir / "rounds.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
                writer.writeheader()
                writer.writerows(self.rows)
        return run_dir


def _mean(clients: list[dict[str, float]], key: str) -> float:
    values = [c[key] for c in clients if key in c]
    return float(np.mean(values)) if values else math.nan


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__}")
