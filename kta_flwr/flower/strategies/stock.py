"""Flower's stock parameter strategies (FedAvg, FedProx and the robust aggregators
FedMedian, Krum, FedTrimmedAvg), their maths unchanged, with evaluation every few rounds,
waiting for nodes with a deadline, and the boundary checks of every reply
(:mod:`kta_flwr.flower.validation`) before their aggregation sees it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from kta_flwr.flower.strategies.base import DEFAULT_MAX_EXAMPLES, EvaluateEvery, NodeWait
from kta_flwr.flower.validation import (
    EVALUATE,
    TRAIN,
    Checked,
    ReplyScreen,
    ReplySpec,
    evaluate_metrics,
    like_model,
    train_metrics,
)


class BoundaryChecks:
    """Strategy mixin for Flower's stock strategies: the nodes each round's instructions
    went to are noted, and only replies that pass the screen reach the parent's
    ``aggregate_train``/``aggregate_evaluate`` (train replies: the model's arrays with
    its names, shapes and dtypes, bounded finite values; the client's metrics)."""

    arrayrecord_key: str

    def __init__(self, *args: Any, max_examples: int = DEFAULT_MAX_EXAMPLES,
                 privacy_metrics: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The largest ``num-examples`` a reply may report.
        self.max_examples = max_examples
        #: Train metrics every reply carries under DP (``dp-epsilon``).
        self.privacy_metrics = privacy_metrics
        #: Node id -> the partition it reported (the boundary checks claims against it).
        self.partition_of: dict[int, int] = {}
        #: The boundary every reply passes.
        self.screen = ReplyScreen(holders=lambda: self.partition_of)
        self._train_spec = ReplySpec(train_metrics(max_examples, required=privacy_metrics))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The parent's train messages; their replies must hold a model like ``arrays``."""
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._train_spec = ReplySpec(
            train_metrics(self.max_examples, required=self.privacy_metrics),
            {self.arrayrecord_key: like_model({k: v.numpy() for k, v in arrays.items()},
                                              self.arrayrecord_key)},
        )
        self.screen.expect(TRAIN, (m.metadata.dst_node_id for m in messages))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The parent's evaluate messages, noted for the screen."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        self.screen.expect(EVALUATE, (m.metadata.dst_node_id for m in messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The parent's aggregation of the replies that pass the screen."""
        valid = self.screen.screen(server_round, TRAIN, replies, self._train_spec).valid
        self._note_partitions(valid)
        return super().aggregate_train(server_round, [r.msg for r in valid])  # type: ignore[misc]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The parent's aggregation of the evaluation replies that pass the screen."""
        spec = ReplySpec(evaluate_metrics(self.max_examples))
        valid = self.screen.screen(server_round, EVALUATE, replies, spec).valid
        self._note_partitions(valid)
        return super().aggregate_evaluate(server_round, [r.msg for r in valid])  # type: ignore[misc]

    def _note_partitions(self, valid: list[Checked]) -> None:
        """Each sender now holds the partition it reported (a restarted node takes over)."""
        for reply in valid:
            self.partition_of = {n: p for n, p in self.partition_of.items() if p != reply.partition}
            self.partition_of[reply.node_id] = reply.partition


class FedAvgEvery(EvaluateEvery, NodeWait, BoundaryChecks, FedAvg):
    """Flower's FedAvg with our evaluation schedule, node wait and boundary checks."""


class FedProxEvery(EvaluateEvery, NodeWait, BoundaryChecks, FedProx):
    """Flower's FedProx with our evaluation schedule, node wait and boundary checks."""


class FedMedianEvery(EvaluateEvery, NodeWait, BoundaryChecks, FedMedian):
    """Flower's FedMedian (coordinate-wise median) with the same additions."""


class KrumEvery(EvaluateEvery, NodeWait, BoundaryChecks, Krum):
    """Flower's Krum with the same additions."""


class FedTrimmedAvgEvery(EvaluateEvery, NodeWait, BoundaryChecks, FedTrimmedAvg):
    """Flower's FedTrimmedAvg with the same additions."""


#: Stock strategy name -> its class.
STOCK = {"fedavg": FedAvgEvery, "fedprox": FedProxEvery, "fedmedian": FedMedianEvery,
         "krum": KrumEvery, "fedtrimmedavg": FedTrimmedAvgEvery}
