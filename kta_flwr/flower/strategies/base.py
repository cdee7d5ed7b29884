"""What every strategy of ours shares: evaluation every few rounds, node sampling, config
stamping and evaluation aggregation. The market (:mod:`.market`) and the compressed-update
baselines (:mod:`.compressed`) build on it; Flower's stock strategies take the
evaluation mixin (:mod:`.stock`)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import NotRequired, TypedDict, Unpack

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]
NUM_EXAMPLES = "num-examples"


class EvaluateEvery:  # pylint: disable=too-few-public-methods
    """Strategy mixin: client-side evaluation only every ``evaluate_every`` rounds and in
    round ``last_round`` (the others send no evaluate messages; their rows have no accuracy)."""

    evaluate_every: int = 1
    last_round: int = 0

    def evaluates_in(self, server_round: int) -> bool:
        """True if clients evaluate in ``server_round``."""
        return server_round % self.evaluate_every == 0 or server_round == self.last_round

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The parent's evaluate messages in evaluation rounds, none otherwise."""
        if not self.evaluates_in(server_round):
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]


class NodeOptions(TypedDict):
    """Keyword arguments every :class:`NodeStrategy` takes.

    Keys:
        evaluate_metrics_aggr_fn: aggregates the evaluation replies' metrics.
        train_metrics_aggr_fn: aggregates the train replies' metrics (default None: not at all).
        fraction_train: fraction of connected nodes sampled per training round (default 1).
        min_nodes: wait for this many connected nodes before sampling (default 2).
        seed: seeds node sampling (default 0).
    """

    evaluate_metrics_aggr_fn: MetricsAggregator
    train_metrics_aggr_fn: NotRequired[MetricsAggregator | None]
    fraction_train: NotRequired[float]
    min_nodes: NotRequired[int]
    seed: NotRequired[int]


class NodeStrategy(EvaluateEvery, Strategy):
    """Base of strategies that address each node with its own message; takes the
    :class:`NodeOptions`."""

    def __init__(self, **options: Unpack[NodeOptions]) -> None:
        self.fraction_train = options.get("fraction_train", 1.0)
        self.min_nodes = options.get("min_nodes", 2)
        self.evaluate_metrics_aggr_fn = options["evaluate_metrics_aggr_fn"]
        self.train_metrics_aggr_fn = options.get("train_metrics_aggr_fn")
        self.seed = options.get("seed", 0)
        self._rng = random.Random(self.seed)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate evaluation metrics of the nodes that answered."""
        valid = []
        for msg in replies:
            if msg.has_error():
                log(WARNING, "round %d: evaluation failed on node %d: %s", server_round,
                    msg.metadata.src_node_id, msg.error.reason)
            else:
                valid.append(msg.content)
        return self.evaluate_metrics_aggr_fn(valid, NUM_EXAMPLES) if valid else None

    def train_metrics(self, contents: list[RecordDict], received: int, dropped: int) -> MetricRecord:
        """``replies``/``dropped`` counts plus the aggregated client train metrics."""
        metrics = MetricRecord({"replies": received, "dropped": dropped})
        if self.train_metrics_aggr_fn is not None and contents:
            metrics.update(self.train_metrics_aggr_fn(contents, NUM_EXAMPLES))
        return metrics

    def sample(self, grid: Grid, fraction: float) -> list[int]:
        """A seeded sample of ``fraction`` of the connected nodes (at least one), after
        waiting for ``min_nodes`` to connect."""
        while len(nodes := sorted(grid.get_node_ids())) < self.min_nodes:
            log(INFO, "Waiting for nodes: %d connected, %d required", len(nodes), self.min_nodes)
            time.sleep(1.0)
        size = max(1, int(round(len(nodes) * fraction)))
        return sorted(self._rng.sample(nodes, size))

    @staticmethod
    def stamp(config: ConfigRecord, server_round: int, **extra: str) -> ConfigRecord:
        """A copy of ``config`` with the round number and ``extra`` entries."""
        stamped = ConfigRecord(dict(config))
        stamped["server-round"] = server_round
        stamped.update(extra)
        return stamped
