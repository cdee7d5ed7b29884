"""Compressed-update baselines on Flower's Message API: ``fedavg-topk``, ``sapef``, ``fedkd``.

Round ``r`` as seen by the server (:class:`CompressedUpdates`):

1. ``configure_train``: each sampled node gets the run config plus the records that bring
   its copy of the global model (the model itself under ``fedavg-topk``/``sapef``, the
   shared student under ``fedkd``) to version ``r-1`` (:mod:`kta_flwr.flower.sync`): the
   compressed aggregates it missed, or the dense model when that is cheaper.
2. Clients train and reply with their compressed update (Top-k with error feedback or
   SA-PEF, or SVD factors, :mod:`kta_flwr.maths.update_compression`).
3. ``aggregate_train``: every reply passes the boundary checks
   (:mod:`kta_flwr.flower.validation`: sender, records, metrics, the update's names,
   shapes, entry count and bounded finite values) and bad ones are dropped with a
   warning naming the node; the example-weighted mean of the decompressed updates (or,
   with ``update-aggregation``, their coordinate-wise median or trimmed mean) is
   compressed for the downlink (Top-k: the union of the clients'
   positions, lossless; SVD: the round's energy threshold) and becomes version ``r``.

Evaluation: under ``fedavg-topk``/``sapef`` each node evaluates the current global model
(its evaluate message carries the catch-up, which the node does not keep); under
``fedkd`` each node evaluates its private teacher (no arrays sent).

Downlink accounting: a node's train message carries exactly the compressed aggregates of
the rounds since its last train message (under full participation: one per round), or
the dense model where that is smaller; both are counted at their real size.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any, Unpack

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp import Grid

from kta_flwr.config import UPDATE_AGGREGATIONS
from kta_flwr.flower import protocol
from kta_flwr.flower.strategies.base import NodeOptions, NodeStrategy
from kta_flwr.flower.sync import UPDATE, ModelLog
from kta_flwr.flower.validation import (
    EVALUATE,
    MAX_PARAMETER,
    NUM_EXAMPLES,
    TRAIN,
    InvalidReply,
    ReplySpec,
    check_bounded,
    numpy_arrays,
    train_metrics,
)
from kta_flwr.maths.payload import payload_bytes
from kta_flwr.maths.update_compression import CompressionError, UpdateCodec


def combine_updates(updates: list[np.ndarray], weights: list[float], rule: str,
                    trim_beta: float = 0.2) -> np.ndarray:
    """One ``[P]`` update from the clients' decoded ``[P]`` updates: their mean weighted
    by ``weights`` (FedAvg), or, robust to a few hostile clients and unweighted, their
    coordinate-wise median or ``trim_beta``-trimmed mean (Flower's own ``aggregate_median``
    and ``aggregate_trimmed_avg``, as FedMedian and FedTrimmedAvg use them)."""
    if rule == "mean":
        total = sum(u * w for u, w in zip(updates, weights, strict=True))
        return total / sum(weights)
    results = [([update], 1) for update in updates]
    if rule == "median":
        return aggregate_median(results)[0]
    return aggregate_trimmed_avg(results, trim_beta)[0]


class CompressedUpdates(NodeStrategy):  # pylint: disable=too-many-instance-attributes
    """FedAvg over compressed client updates, with compressed broadcasts.

    Args:
        codec: the compressor (and the model layout it works on).
        initial: version 0 of the shared model, float32 ``[P]``.
        evaluate_global: True: nodes evaluate the global model; False: their own model.
        label: the strategy name, for the logs.
        aggregation: how the round's decoded updates are combined, one of
            :data:`kta_flwr.config.UPDATE_AGGREGATIONS` (:func:`combine_updates`).
        trim_beta: the share cut at each end under ``trimmed-mean``.
        options: sampling and metric hooks, :class:`~kta_flwr.flower.strategies.base.NodeOptions`.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        *,
        codec: UpdateCodec,
        initial: np.ndarray,
        evaluate_global: bool,
        label: str,
        aggregation: str = "mean",
        trim_beta: float = 0.2,
        **options: Unpack[NodeOptions],
    ) -> None:
        super().__init__(**options)
        if aggregation not in UPDATE_AGGREGATIONS:
            raise ValueError(f"aggregation {aggregation!r}: one of {list(UPDATE_AGGREGATIONS)}")
        self.aggregation = aggregation
        self.trim_beta = trim_beta
        self.codec = codec
        self.log = ModelLog(initial, codec)
        self.evaluate_global = evaluate_global
        self.label = label
        self._sent: dict[int, int] = {}

    def summary(self) -> None:
        """Log the compressor and the model size."""
        codec = self.codec
        what = (f"top-k, {codec.k} of {codec.layout.size} values ({codec.fraction:.4%})"
                if codec.name == "topk" else
                f"SVD, energy {codec.energy:.3f} -> {codec.energy_end:.3f}")
        log(INFO, "\t├──> %s: %s, updates combined by %s", self.label, what, self.aggregation)
        log(INFO, "\t└──> Sampling: fraction %.2f, min nodes %d", self.fraction_train, self.min_nodes)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled node's catch-up to the current version, plus the config."""
        del arrays  # the global model lives in self.log
        config = self.stamp(config, server_round)
        messages = []
        self._sent = {}
        for node_id in self.sample(grid, self.fraction_train, TRAIN, server_round):
            content = RecordDict({protocol.CONFIG: config, **self.log.records_for(node_id)})
            self._sent[node_id] = self.log.version
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        log(INFO, "configure_train: %d nodes sampled, global version %d", len(messages),
            self.log.version)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the valid updates (:func:`combine_updates`: by default their mean
        weighted by examples) into the next version; the screen drops the others."""
        screened = self.screen_train(server_round, replies)
        for node_id in screened.errors:
            self.log.lost(node_id)
        for node_id in screened.rejected:  # it synced, but its update is not used
            self.log.acknowledge(node_id, self._sent.get(node_id, 0))
        updates, weights, up_bytes = [], [], 0
        for reply in sorted(screened.valid, key=lambda c: c.partition):  # arrival order aside
            self.log.acknowledge(reply.node_id, self._sent.get(reply.node_id, 0))
            (update, num_bytes), weight = reply.arrays[UPDATE], reply.metrics[NUM_EXAMPLES]
            updates.append(update)
            weights.append(weight)
            up_bytes += num_bytes
        for node_id in set(self._sent) - screened.answered:  # timed out: state unknown
            self.log.lost(node_id)
        metrics = self.train_metrics(screened)
        if updates:
            combined = combine_updates(updates, weights, self.aggregation, self.trim_beta)
            aggregate = self.codec.compress_aggregate(combined.astype(np.float32), server_round)
            self.log.commit(aggregate)
            metrics["uplink-bytes-per-client"] = up_bytes / len(screened.valid)
            metrics["downlink-update-bytes"] = payload_bytes(aggregate)
            metrics["model-version"] = self.log.version
        return None, metrics

    def train_spec(self, server_round: int) -> ReplySpec:
        """Train metrics (``residual-norm`` under Top-k) and the compressed update: at
        most k Top-k entries or SVD factors of at most full rank, decompressing to
        finite values within the parameter bound; checked as (``[P]`` update, payload bytes)."""
        del server_round

        def update(record: ArrayRecord) -> tuple[np.ndarray, int]:
            payload = numpy_arrays(record, UPDATE)
            try:
                vector = self.codec.decompress_upload(payload)
            except CompressionError as err:
                raise InvalidReply(f"record '{UPDATE}'", str(err)) from None
            check_bounded(vector, MAX_PARAMETER, f"record '{UPDATE}' (decompressed)")
            return vector, payload_bytes(payload)

        return ReplySpec(train_metrics(self.max_examples, ("residual-norm",), self.privacy_metrics),
                         {UPDATE: update})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every node evaluates: the global model (its catch-up in the message, not kept
        by the node) or its own model."""
        if not self.evaluates_in(server_round):
            return []
        config = self.stamp(config, server_round)
        messages = []
        for node_id in self.sample(grid, self.fraction_evaluate, EVALUATE, server_round):
            content = RecordDict({protocol.CONFIG: config})
            if self.evaluate_global:
                content.update(self.log.records_for(node_id))
            messages.append(
                Message(content, dst_node_id=node_id, message_type=MessageType.EVALUATE)
            )
        return messages

    # --- node restarts and resumed runs ---------------------------------------------------
    def rekey(self, old: int, new: int) -> None:
        """Node ``new`` now holds ``old``'s partition, and the model copy ``old`` held (a
        restarted node restores it from disk; if it cannot, it fails the sync and gets the
        dense model next)."""
        log_ = self.log
        if old in log_.held:
            log_.held.setdefault(new, log_.held.pop(old))
        if old in log_.unknown:
            log_.unknown.discard(old)
            log_.unknown.add(new)
        if old in self._sent:
            self._sent.setdefault(new, self._sent.pop(old))

    def state_dict(self) -> dict[str, Any]:
        """The global model, its kept updates, each node's version, the sampling state."""
        log_ = self.log
        return {**super().state_dict(), "vector": log_.vector, "version": log_.version,
                "updates": log_.updates, "held": log_.held, "unknown": set(log_.unknown)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        log_ = self.log
        log_.vector = np.array(state["vector"], np.float32)
        log_.version = int(state["version"])
        log_.updates = {int(v): dict(payload) for v, payload in state["updates"].items()}
        log_.held = {int(node): int(version) for node, version in state["held"].items()}
        log_.unknown = {int(node) for node in state["unknown"]}

    def global_model(self) -> dict[str, np.ndarray] | None:
        """The global model's floating-point tensors (fedavg-topk, sapef); None under
        FedKD, whose shared student is not the model clients are evaluated on."""
        return self.codec.layout.unflatten(self.log.vector) if self.evaluate_global else None
