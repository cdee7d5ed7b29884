"""HeteroFL on Flower's Message API (Diao, Ding and Tarokh, "HeteroFL: Computation and
Communication Efficient Federated Learning for Heterogeneous Clients", ICLR 2021).

One global model at full width; each client trains the sub-model of its tier's width rate
(``heterofl-rates``, :meth:`~kta_flwr.config.RunConfig.width_of_partition`): the leading
block of every tensor (:mod:`kta_flwr.maths.heterofl`). Round ``r``:

1. ``configure_train``: the sampled nodes whose partition is not known yet are asked
   which they hold (a query, no arrays); each is sent the sub-model of its tier, so a
   small device downloads, trains and uploads only its share of the model;
2. clients train it on their data (the stock parameter client, :mod:`kta_flwr.client.parameters`,
   whose model is built at the node's width) and reply with it;
3. ``aggregate_train``: every reply passes the boundary checks (the names, shapes and
   dtypes of the sub-model that node was sent, finite bounded values); each entry of the
   global model becomes the plain mean over the clients whose sub-model holds it
   (the paper's Algorithm 1).

Evaluation: each sampled node evaluates its tier's sub-model of the current global model
(as FedAvg's clients evaluate the global model). BatchNorm: the paper's *static* batch
normalisation computes the statistics of a sub-model after training, since statistics
averaged over sub-models of other widths do not describe its activations. Here, with
``static_batch_norm`` (``bn-recalibrate``, the default), each node recomputes them for
the sub-model it was sent on its own training inputs before evaluating
(:data:`~kta_flwr.flower.protocol.STATIC_BATCH_NORM`; the paper pools every client's
data, this keeps them on the node); the averaged statistics still travel in the global
model. Not reproduced: its scaler module; the masked cross-entropy of its non-IID
experiments.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO
from typing import Any, Unpack

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from kta_flwr.flower import protocol
from kta_flwr.flower.strategies.base import NodeOptions, NodeStrategy
from kta_flwr.flower.validation import EVALUATE, TRAIN, ReplySpec, like_model, train_metrics
from kta_flwr.maths.heterofl import aggregate, extract

class HeteroFL(NodeStrategy):
    """Width-scaled sub-models of one global model, averaged entry by entry.

    Args:
        initial_arrays: the global model at full width, at its initialisation.
        tier_shapes: per tier, the tensor shapes of its sub-model (name -> shape; the
            same names as ``initial_arrays``).
        tier_of: partition id -> its tier (an index into ``tier_shapes``).
        static_batch_norm: whether each node recomputes the BatchNorm statistics of the
            sub-model it evaluates on its training inputs first (the paper's static BN).
        options: sampling and metric hooks, :class:`~kta_flwr.flower.strategies.base.NodeOptions`.
    """

    def __init__(self, *, initial_arrays: ArrayRecord, tier_shapes: Sequence[Mapping[str, tuple[int, ...]]],
                 tier_of: Callable[[int], int], static_batch_norm: bool = True,
                 **options: Unpack[NodeOptions]) -> None:
        super().__init__(**options)
        self.static_batch_norm = static_batch_norm
        #: The global model: name -> full-width tensor, in state-dict order.
        self.params = {name: array.numpy() for name, array in initial_arrays.items()}
        self.tier_shapes = [dict(shapes) for shapes in tier_shapes]
        self.tier_of = tier_of
        #: This round's sub-model template of each node sent one (what its reply must match).
        self._sent: dict[int, dict[str, np.ndarray]] = {}

    def summary(self) -> None:
        """Log each tier's share of the global model's entries."""
        total = sum(int(np.prod(shape)) for shape in self.tier_shapes[-1].values())
        for tier, shapes in enumerate(self.tier_shapes):
            entries = sum(int(np.prod(shape)) for shape in shapes.values())
            log(INFO, "\t├──> HeteroFL tier %d: %d of %d entries (%.1f%%)", tier, entries, total,
                100.0 * entries / max(total, 1))

    def submodel(self, node_id: int) -> dict[str, np.ndarray]:
        """The sub-model of the tier of ``node_id``'s partition, cut from the global model."""
        shapes = self.tier_shapes[self.tier_of(self.partition_of[node_id])]
        return extract(self.params, shapes)

    def _messages(self, grid: Grid, kind: str, fraction: float, server_round: int,
                  config: ConfigRecord) -> list[Message]:
        """A seeded sample's messages, each with the sub-model of the node's tier."""
        nodes = self.sample_known(grid, fraction, kind, server_round)
        stamped = self.stamp(config, server_round)
        message_type = MessageType.TRAIN if kind == TRAIN else MessageType.EVALUATE
        messages, self._sent = [], {}
        for node_id in nodes:
            tensors = self.submodel(node_id)
            self._sent[node_id] = tensors
            record = ArrayRecord(OrderedDict((name, Array(value)) for name, value in tensors.items()))
            messages.append(Message(RecordDict({protocol.CONFIG: stamped, protocol.ARRAYS: record}),
                                    dst_node_id=node_id, message_type=message_type))
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled node's sub-model of the current global model."""
        del arrays  # the global model lives in self.params
        return self._messages(grid, TRAIN, self.fraction_train, server_round, config)

    def train_spec(self, server_round: int) -> ReplySpec:
        """Train metrics and, per sender, a model like the sub-model it was sent."""
        del server_round
        return ReplySpec(train_metrics(self.max_examples, required=self.privacy_metrics),
                         arrays_of=lambda node_id: {protocol.ARRAYS: like_model(self._sent.get(node_id, {}), protocol.ARRAYS)})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each entry of the global model: the mean over the valid replies that hold it."""
        screened = self.screen_train(server_round, replies)
        trained = [{name: array.numpy() for name, array in reply.arrays[protocol.ARRAYS].items()}
                   for reply in sorted(screened.valid, key=lambda c: c.partition)]
        if trained:
            self.params = aggregate(self.params, trained)
        return None, self.train_metrics(screened)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled node evaluates its sub-model of the global model, in evaluation rounds."""
        del arrays
        if not self.evaluates_in(server_round):
            return []
        if self.static_batch_norm:
            config = ConfigRecord({**config, protocol.STATIC_BATCH_NORM: True})
        return self._messages(grid, EVALUATE, self.fraction_evaluate, server_round, config)

    # --- the global model, saved state -----------------------------------------------------
    def global_model(self) -> dict[str, np.ndarray] | None:
        """The full-width global model."""
        return dict(self.params)

    def state_dict(self) -> dict[str, Any]:
        """The sampling state and the global model (names in their order)."""
        return {**super().state_dict(), "array_names": list(self.params),
                "arrays": list(self.params.values())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.params = {str(name): np.asarray(value)
                       for name, value in zip(state["array_names"], state["arrays"], strict=True)}
