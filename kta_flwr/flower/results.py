"""Per-round progress lines and the results files of a run.

:class:`RunRecorder` plugs into ``Strategy.start`` through two hooks every strategy
(stock or ours) already has: ``evaluate_metrics_aggr_fn`` (sees each client's evaluation
metrics) and ``evaluate_fn`` (called once at the end of each round). After every round
the ServerApp has it write ``<output-dir>/<timestamp>-<strategy>/results.json`` and
``rounds.csv`` (atomically), so a run that dies keeps every completed round, and after
each round ``rounds/round-<r>.npz`` (:mod:`kta_flwr.flower.round_log`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.common import log

from kta_flwr.config import RunConfig
from kta_flwr.storage import atomic_path, write_text_atomic
from kta_flwr.flower.metering import DOWN, UP, ByteMeter, Traffic
from kta_flwr.flower.protocol import PARTITION_ID, RESTORE_FILE
from kta_flwr.flower.strategies.base import RoundReport
from kta_flwr.flower.round_log import evaluation_arrays, write_round
from kta_flwr.flower.timing import EVALUATE_PHASES, PREFIX, TRAIN_PHASES

MIB = 1024 * 1024
PERSONALIZED = "personalized-accuracy"
GLOBAL = "global-accuracy"
#: The market's server-side global model on the whole test set (``server-model``).
SERVER_GLOBAL = "server-global-accuracy"
#: The seconds the server spent on that model in a round (training and evaluation).
SERVER_SECONDS = "server_model_seconds"
#: The newcomers' mean personalized accuracy in a round (``newcomer-fraction``).
NEWCOMERS = "newcomer-accuracy"
#: Rounds after joining at which the summary reports the newcomers' accuracy.
NEWCOMER_ROUNDS = (1, 2, 5)
SAMPLES = "samples"
#: Train metrics of the ε each client has spent (DP runs) -> their results key.
EPSILONS = {"dp-epsilon": "dp_epsilon", "dp-lifetime-epsilon": "dp_lifetime_epsilon",
            "logit-epsilon": "logit_epsilon"}


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
    """The numeric metrics of each reply (its first MetricRecord), in partition order (so
    means are summed in the same order whatever order the replies arrived in)."""
    clients = [
        {k: float(v) for k, v in rec.metric_records[next(iter(rec.metric_records))].items()
         if isinstance(v, (int, float))}
        for rec in records
    ]
    return sorted(clients, key=lambda c: c.get(PARTITION_ID, math.inf))


def _weighted_means(
    clients: list[dict[str, float]], weighting_key: str, skip: set[str]
) -> dict[str, float]:
    """``{key: sum(w_i x_i) / sum(w_i)}`` over the clients that report ``key`` (weights
    ``w_i`` = their ``weighting_key``), for every key but ``skip``."""
    keys = sorted({key for c in clients for key in c} - skip)
    means = {}
    for key in keys:
        pairs = [(c.get(weighting_key, 1.0), c[key]) for c in clients if key in c]
        total = sum(w for w, _ in pairs)
        if total > 0:
            means[key] = float(sum(w * x for w, x in pairs) / total)
    return means


def _sums(clients: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    return {key: float(sum(c.get(key, 0.0) for c in clients)) for key in keys}


def _phase_seconds(clients: list[dict[str, float]], phases: tuple[str, ...], column: str) -> dict[str, float]:
    """``{"<column><phase>": seconds summed over clients}`` from their ``t-<phase>`` metrics."""
    return {column + phase: sum(c.get(PREFIX + phase, 0.0) for c in clients) for phase in phases}


def round_metrics(row: Mapping[str, Any], decisions: Mapping[str, np.ndarray]) -> dict[str, float]:
    """One round's numbers for a tracker: every number of its results ``row`` but the
    round (accuracies, bytes each way and cumulative, seconds per phase, failures),
    ``cum_mib_total``, and per decision array of one value per client
    ``decisions/<name>_count`` (booleans: how many clients) or ``decisions/<name>_mean``
    (reals: the mean over the clients)."""
    metrics = {key: float(value) for key, value in row.items()
               if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool)}
    if "cum_bytes_up" in row and "cum_bytes_down" in row:
        metrics["cum_mib_total"] = _mib(row["cum_bytes_up"] + row["cum_bytes_down"])
    for name, values in decisions.items():
        values = np.asarray(values)
        if values.ndim != 1 or values.size == 0:
            continue
        if values.dtype == np.bool_:
            metrics[f"decisions/{name}_count"] = float(values.sum())
        elif np.issubdtype(values.dtype, np.floating) and np.isfinite(values).any():
            metrics[f"decisions/{name}_mean"] = float(np.nanmean(values))
    return metrics


class RunRecorder:
    """Collects per-round metrics, byte counts and client time; prints a line per round.

    Each row also carries ``samples`` (samples trained on, summed over clients) and the
    client seconds per phase summed over clients (``train_s_<phase>``, ``eval_s_<phase>``,
    see :mod:`kta_flwr.flower.timing`).
    """

    def __init__(
        self, cfg: RunConfig, meter: ByteMeter, run_id: int | None = None,
        run_dir: Path | None = None, fab_hash: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.meter = meter
        self.run_id = run_id
        #: Where the results go (None: a new ``<timestamp>-<strategy>`` folder on first write).
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        self.clients_last_round: list[dict[str, float]] = []
        #: The strategy's aggregated train metrics per round (market diagnostics, counts).
        self.train_metrics: dict[str, dict[str, float]] = {}
        #: The run ids this run's rows came from (more than one after a resume).
        self.run_ids: list[int | None] = [run_id]
        #: Where each of ``run_ids`` ran (:func:`host_environment`), in the same order.
        self.environments: list[dict[str, Any]] = [host_environment(fab_hash)]
        #: DP runs: ``{"dp_epsilon": {partition: ε spent by its latest report}, ...}``.
        self.epsilon: dict[str, dict[str, float]] = {}
        #: Every node that held a partition in this run (across resumes): node id -> partition.
        self.partition_of: dict[int, int] = {}
        #: Each partition's client seconds in train replies (all phases) and rounds trained.
        self.train_seconds: dict[int, float] = {}
        self.train_rounds: dict[int, int] = {}
        #: The partitions that join late (``newcomer-fraction``): their mean accuracy is a
        #: column of its own (:data:`NEWCOMERS`).
        self.newcomers: frozenset[int] = frozenset()
        self._clients: list[dict[str, float]] = []
        self._trained: list[dict[str, float]] = []
        self._started = time.monotonic()
        self._elapsed_before = 0.0  # seconds of the runs this one resumes
        #: Unix time at which the recorder (the ServerApp's main) started.
        self.started_at = time.time()

    def elapsed(self) -> float:
        """Seconds since the run started (across resumes)."""
        return self._elapsed_before + time.monotonic() - self._started

    def note_partitions(self, partition_of: dict[int, int]) -> None:
        """Remember which partition each node holds (``partition_of``: node id ->
        partition), for the bytes per tier."""
        self.partition_of.update(partition_of)

    # Hook: the strategy's aggregated train metrics --------------------------------------
    def note_train_metrics(self, server_round: int, metrics: MetricRecord) -> None:
        """Keep round ``server_round``'s aggregated train metrics (results and the line)."""
        self.train_metrics[str(server_round)] = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float))
        }

    # Hook: train_metrics_aggr_fn ----------------------------------------------------
    def aggregate_train(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """Each train metric's mean weighted by ``weighting_key`` over the replies that
        carry it (a metric some replies lack, such as ``distill-loss``, is not diluted by
        them); sums of samples and seconds; no mean of ``partition-id``."""
        self._trained = _client_metrics(records)
        keys = [SAMPLES] + [PREFIX + phase for phase in TRAIN_PHASES]
        out = MetricRecord(_weighted_means(self._trained, weighting_key,
                                           skip={weighting_key, PARTITION_ID, *keys}))
        out.update({k: v for k, v in _sums(self._trained, keys).items()
                    if any(k in c for c in self._trained)})
        return out

    # Hook: evaluate_metrics_aggr_fn -------------------------------------------------
    def aggregate_evaluate(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """Unweighted mean over clients of each client's evaluation metrics."""
        del weighting_key  # every client counts once: mean personalized accuracy
        self._clients = _client_metrics(records)
        keys = sorted(set.intersection(*(set(c) for c in self._clients)))
        return MetricRecord({k: float(np.mean([c[k] for c in self._clients])) for k in keys})

    # Hook: evaluate_fn ----------------------------------------------------------------
    def end_round(self, server_round: int, report: RoundReport | None = None,
                  server: Mapping[str, float] | None = None) -> MetricRecord:
        """Close round ``server_round``: one row, one log line, and the round's file
        (:mod:`kta_flwr.flower.round_log`: the market's decisions, each client's
        evaluation). ``report``: the replies the boundary checks dropped (counted as
        failed with the error replies) and the nodes' restore notes (counted and named).
        ``server``: what the server measured itself (:data:`SERVER_GLOBAL`), into the row."""
        report = report or RoundReport()
        rejected = report.rejected
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
            **(server or {}),
            **({NEWCOMERS: _mean([c for c in clients if int(c.get(PARTITION_ID, -1)) in self.newcomers],
                                 PERSONALIZED)} if self.newcomers else {}),
            "clients_evaluated": len(clients),
            "messages": traffic.sent,
            "failed": traffic.failed + rejected,
            "rejected": rejected,
            "restore_warnings": len(report.notes),
            **_traffic_row(traffic, ""),
            **_traffic_row(self.meter.cumulative, "cum_"),
            SAMPLES: int(sum(c.get(SAMPLES, 0.0) for c in trained)),
            **{k: round(v, 4) for k, v in seconds.items()},
            "seconds": round(self.elapsed(), 3),
        }
        market = self.train_metrics.get(str(server_round), {})
        stale, market_seconds = market.get("market-stale"), market.get("market-seconds")
        if stale is not None:
            row["stale"] = int(stale)
        if market_seconds is not None:
            row["market_seconds"] = round(market_seconds, 4)
        row.update(self._note_epsilon(trained))
        for client in trained:
            if PARTITION_ID in client:
                partition = int(client[PARTITION_ID])
                self.train_seconds[partition] = self.train_seconds.get(partition, 0.0) + sum(
                    client.get(PREFIX + phase, 0.0) for phase in TRAIN_PHASES)
                self.train_rounds[partition] = self.train_rounds.get(partition, 0) + 1
        self.rows.append(row)
        self.clients_last_round = clients
        write_round(self.ensure_run_dir(), server_round,
                    {**report.decisions, **evaluation_arrays(clients)})
        log(
            INFO,
            "[%s] round %d/%d | pers-acc %.4f | global-acc %.4f%s | clients %d, failed %d%s%s | "
            "%s%sMiB up %.4f down %.4f | cum MiB up %.4f down %.4f total %.4f | %.1f s",
            self.cfg.strategy, server_round, self.cfg.num_server_rounds,
            row[PERSONALIZED], row[GLOBAL],
            f" | server-acc {row[SERVER_GLOBAL]:.4f}" if SERVER_GLOBAL in row else "",
            len(clients), row["failed"],
            "" if stale is None else f", stale {int(stale)}",
            "".join(f", restored node {note.node_id} from {note.notes.get(RESTORE_FILE, '?')}"
                    for note in report.notes),
            "".join(f"{metric} max {row[key + '_max']:.2f} | "
                    for metric, key in EPSILONS.items() if key + "_max" in row),
            ("" if market_seconds is None else f"market {market_seconds:.2f} s | ")
            + (f"server model {row[SERVER_SECONDS]:.2f} s | " if SERVER_SECONDS in row else ""),
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

    def _newcomer_summary(self) -> dict[str, Any]:
        """The newcomers, the round they joined, and their mean personalized accuracy after
        each of :data:`NEWCOMER_ROUNDS` rounds in the fleet (the rounds the run reached)."""
        by_round = {row["round"]: row.get(NEWCOMERS, math.nan) for row in self.rows}
        joined = self.cfg.newcomer_round
        return {"partitions": sorted(self.newcomers), "join_round": joined,
                "personalized_after_rounds": {str(k): by_round[joined + k - 1]
                                              for k in NEWCOMER_ROUNDS if joined + k - 1 in by_round}}

    def _note_epsilon(self, trained: list[dict[str, float]]) -> dict[str, float]:
        """Keep each client's reported ε; the round's max and median over its reporters."""
        columns: dict[str, float] = {}
        for metric, key in EPSILONS.items():
            reports = {str(int(c.get(PARTITION_ID, -1))): c[metric] for c in trained if metric in c}
            if reports:
                self.epsilon.setdefault(key, {}).update(reports)
                columns[f"{key}_max"] = round(max(reports.values()), 4)
                columns[f"{key}_median"] = round(float(np.median(list(reports.values()))), 4)
        return columns

    # Output -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Totals and final metrics of the run."""
        cum = self.meter.cumulative
        up, down = cum.total(UP, "train"), cum.total(DOWN, "train")
        last = self.rows[-1] if self.rows else {}
        return {
            "final_personalized_accuracy": last.get(PERSONALIZED, math.nan),
            "final_global_accuracy": last.get(GLOBAL, math.nan),
            **({"final_server_global_accuracy": last[SERVER_GLOBAL]} if SERVER_GLOBAL in last else {}),
            **({"newcomers": self._newcomer_summary()} if self.newcomers else {}),
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
            "failed": int(sum(row["failed"] for row in self.rows)),
            "seconds": round(self.elapsed(), 3),
            "server_peak_rss_mib": round(peak_rss_mib(), 1),
            **{key: dict(sorted(per_client.items(), key=lambda kv: int(kv[0])))
               for key, per_client in self.epsilon.items()},
            **({"tiers": self.tier_summary()} if self.cfg.fleet else {}),
            "started_at": self.started_at,
            "finished_at": time.time(),
        }

    def tier_summary(self) -> dict[str, dict[str, Any]]:
        """Per tier of the fleet (``fleet``): its model
        (:meth:`~kta_flwr.config.RunConfig.tier_model`), the partitions that reported, their
        mean final personalized and global accuracy, bytes up and down summed over the
        tier's nodes, and the mean client seconds per train reply (a small device must not
        pay for a big one)."""
        cum = self.meter.cumulative
        reported = {*self.train_rounds, *(int(c[PARTITION_ID]) for c in self.clients_last_round
                                          if PARTITION_ID in c)}
        out: dict[str, dict[str, Any]] = {}
        for index, (tier, _) in enumerate(self.cfg.fleet_tiers):
            members = {p for p in reported if self.cfg.tier_of_partition(p) == index}
            final = [c for c in self.clients_last_round if int(c.get(PARTITION_ID, -1)) in members]
            nodes = [n for n, p in self.partition_of.items() if p in members]
            replies = sum(self.train_rounds.get(p, 0) for p in members)
            out[tier] = {
                "model": self.cfg.tier_model(index),
                "partitions": sorted(members),
                PERSONALIZED: _mean(final, PERSONALIZED),
                GLOBAL: _mean(final, GLOBAL),
                "bytes_up": sum(cum.per_node.get(n, {}).get(UP, 0) for n in nodes),
                "bytes_down": sum(cum.per_node.get(n, {}).get(DOWN, 0) for n in nodes),
                "train_seconds_per_reply": (sum(self.train_seconds.get(p, 0.0) for p in members)
                                            / replies if replies else math.nan),
            }
        return out

    def write(self, extra: dict[str, Any] | None = None) -> Path:
        """Write ``results.json`` and ``rounds.csv`` (atomically, so a crash leaves the
        previous round's files); return the run directory."""
        run_dir = self.ensure_run_dir()
        payload = {
            "run_id": self.run_id,
            "run_ids": self.run_ids,
            "environments": self.environments,
            "config": self.cfg.to_flwr(),
            "summary": self.summary(),
            "rounds": self.rows,
            "clients_last_round": self.clients_last_round,
            "train_metrics": self.train_metrics,
            **(extra or {}),
        }
        write_text_atomic(run_dir / "results.json", json.dumps(payload, indent=2, default=_jsonable))
        if self.rows:
            columns = list(dict.fromkeys(key for row in self.rows for key in row))
            with atomic_path(run_dir / "rounds.csv") as tmp, tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)
        return run_dir

    def ensure_run_dir(self) -> Path:
        """The run directory, created on first use: ``<output-dir>/<timestamp>-<strategy>``."""
        if self.run_dir is None:
            root = self.cfg.resolved_output_dir()
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = root / f"{stamp}-{self.cfg.strategy}"
            if run_dir.exists():
                run_dir = root / f"{stamp}-{self.cfg.strategy}-{self.run_id or time.time_ns()}"
            run_dir.mkdir(parents=True, exist_ok=False)
            self.run_dir = run_dir
        return self.run_dir

    # Checkpoint -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue the results."""
        return {"rows": self.rows, "clients_last_round": self.clients_last_round,
                "train_metrics": self.train_metrics, "run_ids": self.run_ids,
                "environments": self.environments, "epsilon": self.epsilon,
                "partition_of": dict(self.partition_of), "train_seconds": dict(self.train_seconds),
                "train_rounds": dict(self.train_rounds),
                "elapsed": self.elapsed(), "started_at": self.started_at,
                "meter": self.meter.cumulative.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (this run's id is added to ``run_ids``)."""
        self.rows = list(state["rows"])
        self.clients_last_round = list(state["clients_last_round"])
        self.train_metrics = dict(state["train_metrics"])
        self.run_ids = [*state["run_ids"], self.run_id]
        earlier = state.get("environments", [{}] * len(state["run_ids"]))  # older checkpoints
        self.environments = [*earlier, *self.environments[-1:]]
        self.epsilon = dict(state.get("epsilon", {}))
        self.partition_of = {int(n): int(p) for n, p in state.get("partition_of", {}).items()}
        self.train_seconds = {int(p): float(s) for p, s in state.get("train_seconds", {}).items()}
        self.train_rounds = {int(p): int(r) for p, r in state.get("train_rounds", {}).items()}
        self._elapsed_before = float(state["elapsed"])
        self.started_at = float(state["started_at"])
        self.meter.cumulative = Traffic.from_state(state["meter"])


def host_environment(fab_hash: str | None = None) -> dict[str, Any]:
    """What the ServerApp ran on, so that results from different machines can be told
    apart: CPU model, its widest SIMD (which kernels torch picks, so float rounding) and
    core count, OS, Python, the versions of the numeric stack and Flower, and
    ``fab_hash``, the SHA-256 of the Flower app bundle that ran: the ServerApp runs from
    the copy ``flwr run`` installed, which has no git history, so that hash names the code.
    In simulation the clients run on the same host; in a deployment they report nothing of
    theirs here."""
    versions = {}
    for package in ("kta-flwr", "flwr", "torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu, simd = _cpu_info()
    return {
        "cpu": cpu,
        "simd": simd,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "fab_hash": fab_hash or None,
    }


#: x86 vector extensions, widest first (``/proc/cpuinfo`` flag names).
SIMD_FLAGS = ("amx_tile", "avx512f", "avx2", "avx", "sse4_2")


def _cpu_info() -> tuple[str, str | None]:
    """(CPU model, widest of :data:`SIMD_FLAGS` it has); Linux reads ``/proc/cpuinfo``,
    elsewhere the model is :func:`platform.processor` and the SIMD unknown (None)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    simd = next((flag for flag in SIMD_FLAGS if flag in flags), None)
    return model or platform.processor() or platform.machine(), simd


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; the ServerApp's, in simulation
    the process that also drives Ray)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes / KiB


def _mean(clients: list[dict[str, float]], key: str) -> float:
    values = [c[key] for c in clients if key in c]
    return float(np.mean(values)) if values else math.nan


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__}")
