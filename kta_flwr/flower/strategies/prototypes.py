"""FedProto on Flower's Message API (Tan, Long, Liu, Zhou, Lu, Jiang and Zhang, "FedProto:
Federated Prototype Learning across Heterogeneous Clients", AAAI 2022).

Clients keep their own models (any architecture) and exchange class prototypes, the mean
embedding of each class they hold (:mod:`kta_flwr.maths.prototypes`). Round ``r``:

1. ``configure_train``: each sampled node gets the global prototypes of round ``r-1``
   (none in round 1): ``[m, d]`` float32 for the ``m`` classes some client holds, and
   their ``[m]`` int32 class ids;
2. the client trains with cross-entropy plus ``prototype-weight`` times the squared
   distance of its embeddings to their class's global prototype
   (:mod:`kta_flwr.client.prototypes`) and replies with its own prototypes, in the same
   format (at most ``C x d`` float32 and ``C`` int32);
3. ``aggregate_train``: every reply passes the boundary checks (shapes, dtypes, distinct
   class ids in ``[0, C)``, finite bounded values); each class's global prototype is the
   plain mean over the clients that hold it (as the authors' code averages them).

Evaluation: each node evaluates its own model (nothing is sent). Embeddings of different
sizes meet in a common size ``d`` through a fixed, seeded projection per width
(:func:`kta_flwr.task.training.embedding_projection`); with equal sizes there is none,
the published rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any, Unpack

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from kta_flwr.flower import protocol
from kta_flwr.flower.strategies.base import NodeOptions, NodeStrategy
from kta_flwr.flower.timing import PREFIX
from kta_flwr.flower.validation import MAX_PARAMETER, TRAIN, InvalidReply, ReplySpec, check_bounded
from kta_flwr.flower.validation import numpy_arrays, train_metrics
from kta_flwr.maths.prototypes import aggregate_prototypes

#: The array record of prototypes, both ways: ``values`` ``[m, d]`` float32, ``classes`` ``[m]`` int32.
PROTOTYPES = "prototypes"


def prototype_record(values: np.ndarray, classes: np.ndarray) -> ArrayRecord:
    """Prototypes ``[m, d]`` of ``classes`` ``[m]`` as the record both sides send."""
    return ArrayRecord({"values": Array(np.asarray(values, np.float32)),
                        "classes": Array(np.asarray(classes, np.int32))})


def read_prototypes(record: ArrayRecord, num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``([m, d] float32, [m] int32)`` from a prototype record, checked: 1 <= m <= C
    distinct ascending class ids in ``[0, C)``, finite values within :data:`MAX_PARAMETER`.

    Raises:
        InvalidReply: naming the array and what is wrong.
    """
    arrays = numpy_arrays(record, PROTOTYPES)
    if sorted(arrays) != ["classes", "values"]:
        raise InvalidReply(f"record '{PROTOTYPES}'", f"holds {sorted(arrays)}, not ['classes', 'values']")
    values, classes = arrays["values"], arrays["classes"]
    if classes.dtype != np.int32 or classes.ndim != 1 or not 1 <= len(classes) <= num_classes:
        raise InvalidReply(f"array '{PROTOTYPES}/classes'", f"is {classes.dtype}{list(classes.shape)}, "
                           f"expected int32[m] with 1 <= m <= {num_classes}")
    if classes.min() < 0 or classes.max() >= num_classes or np.any(np.diff(classes) <= 0):
        raise InvalidReply(f"array '{PROTOTYPES}/classes'",
                           f"must be distinct ascending class ids in [0, {num_classes})")
    if values.dtype != np.float32 or values.shape != (len(classes), dim):
        raise InvalidReply(f"array '{PROTOTYPES}/values'", f"is {values.dtype}{list(values.shape)}, "
                           f"expected float32{[len(classes), dim]}")
    check_bounded(values, MAX_PARAMETER, f"array '{PROTOTYPES}/values'")
    return values, classes


class FedProto(NodeStrategy):
    """Class prototypes, averaged per class over the clients that hold it.

    Args:
        num_classes: C.
        dim: d, the prototypes' size (``prototype-dim``).
        options: sampling and metric hooks, :class:`~kta_flwr.flower.strategies.base.NodeOptions`.
    """

    def __init__(self, *, num_classes: int, dim: int, **options: Unpack[NodeOptions]) -> None:
        super().__init__(**options)
        self.num_classes = num_classes
        self.dim = dim
        #: The global prototypes of the last round and their classes (empty before round 1).
        self.values = np.zeros((0, dim), np.float32)
        self.classes = np.zeros(0, np.int32)

    def summary(self) -> None:
        """Log the prototypes' size."""
        log(INFO, "\t├──> FedProto: %d classes x %d floats per prototype set", self.num_classes, self.dim)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The config and, after round 1, the global prototypes, to each sampled node."""
        del arrays
        stamped = self.stamp(config, server_round)
        content: dict[str, Any] = {protocol.CONFIG: stamped}
        if len(self.classes):
            content[PROTOTYPES] = prototype_record(self.values, self.classes)
        return [Message(RecordDict(dict(content)), dst_node_id=node_id, message_type=MessageType.TRAIN)
                for node_id in self.sample(grid, self.fraction_train, TRAIN, server_round)]

    def train_spec(self, server_round: int) -> ReplySpec:
        """Train metrics and the sender's prototypes (:func:`read_prototypes`)."""
        del server_round
        required = (*self.privacy_metrics, f"{PREFIX}predict")  # the prototypes' pass
        return ReplySpec(train_metrics(self.max_examples, required=required),
                         {PROTOTYPES: lambda record: read_prototypes(record, self.num_classes, self.dim)})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each class's global prototype: the mean over the valid replies that hold it."""
        screened = self.screen_train(server_round, replies)
        uploads = [reply.arrays[PROTOTYPES] for reply in sorted(screened.valid, key=lambda c: c.partition)]
        metrics = self.train_metrics(screened)
        if uploads:
            values, held = aggregate_prototypes(uploads, self.num_classes, self.dim)
            self.values, self.classes = values[held], np.flatnonzero(held).astype(np.int32)
            metrics["prototype-classes"] = len(self.classes)
        return None, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled node evaluates its own model, in evaluation rounds."""
        del arrays
        return self.own_model_evaluations(server_round, config, grid)

    def state_dict(self) -> dict[str, Any]:
        """The sampling state and the global prototypes."""
        return {**super().state_dict(), "values": self.values, "classes": self.classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.values = np.asarray(state["values"], np.float32).reshape(-1, self.dim)
        self.classes = np.asarray(state["classes"], np.int32)
