"""The "largest common sub-model" a practitioner tries first on a mixed fleet
(``fedavg-common``): Flower's FedAvg among the clients of the fleet's most common
architecture; every other client trains its own model alone (as under ``local``).

Round ``r``: the sampled nodes whose partition is not known yet are asked which they hold
(a query, no arrays); members get FedAvg's train message (the global model), the others a
message with the config only. Members reply with their trained weights (checked like
FedAvg's), the others with metrics only; Flower's FedAvg aggregates the members'. In
evaluation rounds members evaluate the global model, the others their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Unpack

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from kta_flwr.flower import protocol
from kta_flwr.flower.grids import SampledGrid
from kta_flwr.flower.strategies.base import NodeOptions
from kta_flwr.flower.strategies.stock import StockStrategy
from kta_flwr.flower.validation import EVALUATE, TRAIN, ReplySpec, like_model, train_metrics


class CommonFedAvg(StockStrategy):
    """FedAvg among the members of the common architecture; the rest train locally.

    Args:
        initial_arrays: the common architecture's model at its initialisation.
        is_member: partition id -> whether its architecture is the common one.
        options: sampling and metric hooks, :class:`~kta_flwr.flower.strategies.base.NodeOptions`.
    """

    def __init__(self, *, initial_arrays: ArrayRecord, is_member: Callable[[int], bool],
                 **options: Unpack[NodeOptions]) -> None:
        super().__init__(name="fedavg", initial_arrays=initial_arrays, **options)
        self.is_member = is_member

    def _member(self, node_id: int) -> bool:
        """Whether ``node_id``'s partition trains the common architecture (False if unknown)."""
        partition = self.partition_of.get(node_id)
        return partition is not None and self.is_member(partition)

    def _messages(self, grid: Grid, kind: str, fraction: float, server_round: int,
                  config: ConfigRecord, arrays: ArrayRecord) -> list[Message]:
        """FedAvg's messages to the sampled members, the config alone to the others."""
        nodes = self.sample_known(grid, fraction, kind, server_round)
        stamped = self.stamp(config, server_round)
        members = [n for n in nodes if self._member(n)]
        configure = self.flower.configure_train if kind == TRAIN else self.flower.configure_evaluate
        messages = list(configure(server_round, arrays, stamped, SampledGrid(grid, members))) if members else []
        message_type = MessageType.TRAIN if kind == TRAIN else MessageType.EVALUATE
        return messages + [Message(RecordDict({protocol.CONFIG: stamped}), dst_node_id=n,
                                   message_type=message_type)
                           for n in nodes if not self._member(n)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Members: the global model; the others: the config."""
        return self._messages(grid, TRAIN, self.fraction_train, server_round, config, arrays)

    def train_spec(self, server_round: int) -> ReplySpec:
        """Train metrics; members' replies hold a model like the global one, the others' none."""
        del server_round
        key = self.flower.arrayrecord_key
        model = {key: like_model({k: v.numpy() for k, v in self.arrays.items()}, key)}
        return ReplySpec(train_metrics(self.max_examples, required=self.privacy_metrics),
                         arrays_of=lambda node_id: model if self._member(node_id) else {})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvg over the members' valid replies."""
        screened = self.screen_train(server_round, replies)
        members = [reply for reply in screened.valid if self.is_member(reply.partition)]
        return self.aggregate(server_round, members), self.train_metrics(screened)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Members evaluate the global model, the others their own, in evaluation rounds."""
        if not self.evaluates_in(server_round):
            return []
        return self._messages(grid, EVALUATE, self.fraction_evaluate, server_round, config, arrays)
