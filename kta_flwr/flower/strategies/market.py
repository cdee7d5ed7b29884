"""The knowledge-market Strategy on Flower's Message API (kta, fedmd, ktpfl, local).

Round ``r`` of :class:`KnowledgeMarket` (kta, fedmd) as seen by the server:

1. ``configure_train``: each sampled client gets the run's ``ConfigRecord`` plus, if the
   market has priced it before, its personalized soft targets ``q_k`` computed from the
   logits uploaded in earlier rounds (round ``r-1`` under full participation).
2. Clients train (stage 1), distill toward ``q_k`` (stage 2) and reply with their logits
   on the reference set.
3. ``aggregate_train``: every reply passes the boundary checks
   (:mod:`kta_flwr.flower.validation`: sender, records, metrics, logits' shape, dtype and
   bounded finite values) and bad ones are dropped with a warning naming the node; the market
   (:func:`kta_flwr.maths.market.run_market`) runs on the latest valid logits of every client
   and stores the targets each client receives in round ``r+1``.

``local`` is the same strategy without a market: clients only get instructions and reply
with metrics. The market's maths is in :mod:`kta_flwr.maths.market`; what crosses the wire
in :mod:`kta_flwr.flower.protocol`; the method in words in ``docs/method.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any, Unpack

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from kta_flwr.flower import protocol
from kta_flwr.flower.round_log import market_arrays
from kta_flwr.flower.strategies.base import Consensus, NodeOptions, NodeStrategy
from kta_flwr.flower.validation import (
    MAX_CENTRED_LOGIT,
    TRAIN,
    InvalidReply,
    ReplySpec,
    check_bounded,
    train_metrics,
)
from kta_flwr.maths.knowledge_codec import Codec
from kta_flwr.maths.market import MarketOutput, MarketParams, global_consensus, run_market, softmax
from kta_flwr.maths.market_kernels import FAST, MarketKernels
from kta_flwr.maths.noisy_logits import noisy_logit_bound

def own_rows(targets: np.ndarray, uploads: np.ndarray, reserved: np.ndarray, temperature: float) -> None:
    """Give each client, on its reserved rows, its own upload back as targets (in place).

    Args:
        targets: ``[K, M + T, C]`` the market's targets (reference rows, then transfer rows).
        uploads: ``[K, M, C]`` the clients' logits on the M reference target rows.
        reserved: ``[K, M]`` bool, each client's reserved rows among them.
        temperature: the distillation temperature the targets are at.
    """
    own = softmax(uploads, temperature).astype(targets.dtype)
    reference = targets[:, :uploads.shape[1]]
    reference[reserved] = own[reserved]


class KnowledgeMarket(NodeStrategy):  # pylint: disable=too-many-instance-attributes
    """Prediction-space knowledge market: personalized soft targets per client.

    Args:
        params: market knobs, or None for local-only training (nothing exchanged).
        reference_labels: ``[N_ref]`` labels of the public reference set, or None: the
            unlabeled mode (``reference-labels = none``): the server holds no label and
            scores each client on its *reserve*, ``holdout_fraction`` of the reference rows
            drawn per client from a digest of the first market round's uploads, on which
            it is never sent the others' knowledge (its targets there are its own upload),
            so that it has nothing of theirs to copy where it is judged
            (:mod:`kta_flwr.maths.label_free`).
        num_classes: C.
        fingerprint: hash of the reference set, sent so clients can check their copy.
        codec: how logits and targets are encoded on the wire.
        reference_fraction: share of the reference rows exchanged per round (a rotating
            subset, :func:`kta_flwr.flower.protocol.reference_subset`); 1: all rows.
        holdout_fraction: share of the reference rows held out from distillation each
            round, on which the adaptive market scores its teachers and candidates, drawn
            after the round's uploads (:func:`kta_flwr.flower.protocol.scoring_draw`); 0: none.
        max_staleness: the market uses a node's banked logits for at most this many
            rounds after it uploaded them (absent, failed or unsampled nodes); older ones
            are dropped from the bank.
        kernels: the market's heavy computations (numpy by default; the ServerApp passes
            torch kernels for ``market-device``).
        transfer_size: rows in the unlabeled transfer set (0: none).
        transfer_rows: transfer rows exchanged per round, a rotating window
            (:func:`kta_flwr.flower.protocol.transfer_window`): clients upload logits on
            them after the reference rows and receive targets on them; the server knows
            no label of theirs.
        consensus: also compute, each round, the consensus of the uploads on every row of
            the round's reference subset (:func:`~kta_flwr.maths.market.global_consensus`),
            which the ServerApp distils its global model from (``server-model``); nothing
            more crosses the wire.
        num_reference: N_ref, needed when ``reference_labels`` is None.
        options: sampling and metric hooks, :class:`~kta_flwr.flower.strategies.base.NodeOptions`
            (``seed`` also seeds the reference subsets).
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        *,
        params: MarketParams | None,
        reference_labels: np.ndarray | None,
        num_classes: int,
        fingerprint: str,
        codec: Codec = Codec(),
        reference_fraction: float = 1.0,
        holdout_fraction: float = 0.0,
        max_staleness: int = 3,
        kernels: MarketKernels = FAST,
        logit_noise: tuple[float, float] = (0.0, 0.0),
        transfer_size: int = 0,
        transfer_rows: int = 0,
        consensus: bool = False,
        num_reference: int | None = None,
        **options: Unpack[NodeOptions],
    ) -> None:
        super().__init__(**options)
        if reference_labels is None and (num_reference is None or consensus):
            raise ValueError("KnowledgeMarket: the unlabeled mode (reference_labels=None) needs "
                             "num_reference, and has no consensus (it is scored on the labels)")
        self.computes_consensus = consensus
        #: The last round's consensus (taken by :meth:`take_consensus`).
        self.consensus: Consensus | None = None
        #: What a newcomer starts from, sent with its first instruction (None: nothing).
        self.start_model: ArrayRecord | None = None
        #: The newcomers' partitions that were sent it.
        self.started: set[int] = set()
        #: ``(logit-noise, logit-clip)``: the clients' Gaussian noise on their logits,
        #: which widens the bound of what an honest upload holds.
        self.logit_noise = logit_noise
        self.params = params
        self.reference_labels = None if reference_labels is None else np.asarray(reference_labels)
        self.num_reference = len(reference_labels) if reference_labels is not None else int(num_reference)
        #: Unlabeled mode: the draw the clients' reserves come from (the first market round's).
        self.reserve_draw: int | None = None
        self.num_classes = num_classes
        self.fingerprint = fingerprint
        self.codec = codec
        self.reference_fraction = reference_fraction
        self.holdout_fraction = holdout_fraction
        self.transfer_size = transfer_size
        self.transfer_rows = transfer_rows if transfer_size > 0 else 0
        #: The last round's draw of held-out rows (the next must hold out other rows).
        self.last_draw: int | None = None
        #: Latest valid logits ``[M, C]`` per node id, on the rows of reference subset
        #: ``bank_subset[node]`` (M = N_ref without subsets).
        self.bank: dict[int, np.ndarray] = {}
        self.bank_subset: dict[int, int] = {}
        #: The round each node's banked logits were uploaded in.
        self.bank_round: dict[int, int] = {}
        self.max_staleness = max_staleness
        self.kernels = kernels
        #: Targets ``[M, C]`` each node receives with its next instruction, and their subset.
        self.targets: dict[int, np.ndarray] = {}
        self.target_subset: dict[int, int] = {}
        #: The draw of the held-out rows each node's pending targets leave out.
        self.target_draw: dict[int, int] = {}
        #: The last market computation (node ids in ``self.market_nodes`` order).
        self.last_market: MarketOutput | None = None
        self.market_nodes: list[int] = []
        #: The last round's decisions as arrays for the run folder
        #: (:func:`kta_flwr.flower.round_log.market_arrays`); taken by :meth:`round_decisions`.
        self.round_record: dict[str, np.ndarray] = {}

    # --- Strategy interface -----------------------------------------------------------
    def summary(self) -> None:
        """Log the market configuration."""
        log(INFO, "\t├──> Knowledge market: %s", self.params or "none (local-only)")
        log(INFO, "\t├──> Reference set: %d samples, %d classes (fingerprint %s)%s",
            self.num_reference, self.num_classes, self.fingerprint,
            "" if self.reference_labels is not None else ", no labels on the server")
        log(INFO, "\t└──> Sampling: fraction %.2f, min nodes %d", self.fraction_train, self.min_nodes)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Instructions for the sampled nodes, each with its own targets (if any)."""
        node_ids = self.sample(grid, self.fraction_train, TRAIN, server_round)
        config = self.stamp(config, server_round, **{
            protocol.FINGERPRINT: self.fingerprint, protocol.LOGITS_SUBSET: server_round + 1,
        })
        messages = []
        for node_id in node_ids:
            content = RecordDict({protocol.CONFIG: config})
            if node_id in self.targets:
                content[protocol.TARGETS] = protocol.pack(
                    self.targets[node_id], self.codec, protocol.TARGETS
                )
                extra = {protocol.TARGETS_SUBSET: self.target_subset[node_id]}
                if self.holdout_fraction > 0:
                    extra[protocol.TARGETS_HOLDOUT] = self.target_draw[node_id]
                content[protocol.CONFIG] = ConfigRecord({**config, **extra})
            if self.start_model is not None and self.joins_in(node_id) > 1 and (
                    self.partition_of[node_id] not in self.started):  # a newcomer's first instruction
                content[protocol.START_MODEL] = self.start_model
                self.started.add(self.partition_of[node_id])
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        with_targets = sum(n in self.targets for n in node_ids)
        log(INFO, "configure_train: %d nodes sampled, %d with personalized targets",
            len(node_ids), with_targets)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Bank the logits of the valid replies (the screen drops the others), run the
        market for the next round."""
        screened = self.screen_train(server_round, replies)
        for reply in screened.valid:
            if self.params is not None:
                node_id = reply.node_id
                self.bank[node_id] = reply.arrays[protocol.LOGITS]
                self.bank_subset[node_id] = server_round + 1
                self.bank_round[node_id] = server_round
        metrics = self.train_metrics(screened)
        if self.params is not None and self.bank:
            started = time.perf_counter()
            metrics.update(self._price(server_round))
            metrics["market-seconds"] = time.perf_counter() - started
        return None, metrics

    def train_spec(self, server_round: int) -> ReplySpec:
        """Train metrics (``distill-loss`` and stage 2's seconds only with targets) and,
        unless local-only, the logits on round ``server_round + 1``'s reference subset."""
        metrics = train_metrics(self.max_examples, ("distill-loss", "t-stage2", "t-predict"),
                                self.privacy_metrics)
        if self.params is None:
            return ReplySpec(metrics)
        num_rows = len(self.rows(server_round + 1)) + self.transfer_rows
        bound = noisy_logit_bound(*self.logit_noise, num_rows, MAX_CENTRED_LOGIT)

        def logits(record: ArrayRecord) -> np.ndarray:
            try:
                rows = protocol.decode_record(record, protocol.LOGITS, num_rows,
                                              self.num_classes, self.codec)
            except protocol.InvalidPayload as err:
                raise InvalidReply(f"record '{protocol.LOGITS}'", str(err)) from None
            check_bounded(rows - rows.mean(axis=1, keepdims=True), bound,
                          f"record '{protocol.LOGITS}' (centred logits)")
            return rows

        return ReplySpec(metrics, {protocol.LOGITS: logits})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask every node to evaluate its own personalized model (no arrays sent), in the
        rounds :meth:`evaluates_in` names."""
        del arrays
        return self.own_model_evaluations(server_round, config, grid,
                                          **{protocol.FINGERPRINT: self.fingerprint})

    def rows(self, subset_id: int) -> np.ndarray:
        """Reference rows of subset ``subset_id`` (all rows without subsets)."""
        return protocol.reference_subset(
            self.num_reference, self.reference_fraction, self.seed, subset_id
        )

    def transfer(self, subset_id: int) -> np.ndarray:
        """Transfer rows exchanged with subset ``subset_id`` (none without a transfer set)."""
        return protocol.transfer_window(self.transfer_size, self.transfer_rows, self.seed, subset_id)

    def _price(self, server_round: int) -> dict[str, float]:
        """Run the market on the banked logits of the next round's reference subset
        (every banked node when all rows are exchanged) that are at most
        ``max_staleness`` rounds old; store those nodes' next targets."""
        assert self.params is not None
        subset_id = server_round + 1
        for node in [n for n, r in self.bank_round.items() if server_round - r > self.max_staleness]:
            log(INFO, "round %d: dropping node %d's logits from the bank (from round %d)",
                server_round, node, self.bank_round[node])
            for table in (self.bank, self.bank_subset, self.bank_round):
                del table[node]
        # every banked upload covers the same rows only when all reference rows and no
        # rotating transfer rows are exchanged
        whole = self.reference_fraction >= 1.0 and self.transfer_rows == 0
        self.market_nodes = sorted(
            (n for n in self.bank if whole or self.bank_subset[n] == subset_id),
            key=lambda n: (self.partition_of.get(n, 1 << 62), n),
        )
        if not self.market_nodes:  # nobody uploaded this subset: no targets next round
            self.targets, self.target_subset, self.target_draw = {}, {}, {}
            return {"market-clients": 0, "market-stale": 0}
        stale = sum(self.bank_round[n] < server_round for n in self.market_nodes)
        stacked = np.stack([self.bank[n] for n in self.market_nodes])
        rows = self.rows(subset_id)
        # The scored rows: drawn now, from every upload of the round (no client could
        # compute them before it uploaded). Targets never cover them; the gate may keep
        # the targets back.
        num_reference = self.num_reference
        self.last_draw = protocol.scoring_draw(server_round, stacked, self.last_draw,
                                               num_reference, self.holdout_fraction)
        held_out = protocol.held_out_mask(num_reference, self.holdout_fraction, self.last_draw)[rows]
        labeled, unlabeled = stacked[:, :len(rows)], stacked[:, len(rows):]
        reserves = self._reserves(rows)
        out = run_market(labeled, None if reserves is not None else self.reference_labels[rows],
                         self.params, held_out=held_out, kernels=self.kernels, target_rows=~held_out,
                         unlabeled=unlabeled if self.transfer_rows else None, scored=reserves)
        if reserves is not None:
            own_rows(out.targets, labeled[:, ~held_out], reserves[:, ~held_out], self.params.temperature)
        self.last_market = out
        if self.computes_consensus:
            agreed = global_consensus(labeled, self.reference_labels[rows], self.params, out.divergence,
                                      out.priors, unlabeled=unlabeled if self.transfer_rows else None)
            self.consensus = Consensus(rows, agreed[:len(rows)], self.transfer(subset_id), agreed[len(rows):])
        self.targets = {n: q for n, q, go in zip(self.market_nodes, out.targets, out.distill) if go}
        self.target_subset = dict.fromkeys(self.targets, subset_id)
        self.target_draw = dict.fromkeys(self.targets, self.last_draw)
        row_bytes = self.codec.row_bytes(self.num_classes)
        uploaded = [self.bank_round[n] == server_round for n in self.market_nodes]
        self.round_record = market_arrays(
            out, [self.partition_of.get(n, -1) for n in self.market_nodes], uploaded,
            bytes_up=[row_bytes * (len(rows) + self.transfer_rows) * up for up in uploaded],
            bytes_down=[row_bytes * (int((~held_out).sum()) + self.transfer_rows) * go
                        for go in out.distill],
            scored_rows=rows[held_out],
        )
        weights = out.weights
        entropy = -(weights * np.log(np.clip(weights, 1e-12, 1.0))).sum(axis=1)
        return {
            "market-clients": len(self.market_nodes),
            "market-stale": stale,
            "distilling-clients": int(out.distill.sum()),
            "tau-median": float(np.median(out.tau)),
            "reference-accuracy": float(out.accuracy.mean()),
            "self-weight": float(np.diag(weights).mean()),
            "teacher-entropy": float(entropy.mean()),
            "effective-teachers": float(np.exp(entropy).mean()),
        }

    def _reserves(self, rows: np.ndarray) -> np.ndarray | None:
        """Unlabeled mode: ``[K, M]`` bool, each market node's reserve among ``rows``
        (:func:`kta_flwr.flower.protocol.reserve_mask` of its partition, from the first
        market round's draw); None with labels."""
        if self.reference_labels is not None:
            return None
        if self.reserve_draw is None:  # the first market round: its draw is set
            self.reserve_draw = self.last_draw
        return np.stack([
            protocol.reserve_mask(self.num_reference, self.holdout_fraction, self.reserve_draw,
                                  self.partition_of.get(node, node))[rows]
            for node in self.market_nodes
        ])

    def round_decisions(self) -> dict[str, np.ndarray]:
        """The last market round's arrays (empty if the market did not run since)."""
        record, self.round_record = self.round_record, {}
        return record

    def take_consensus(self) -> Consensus | None:
        """The last market round's consensus (None if not asked for, or not run since)."""
        consensus, self.consensus = self.consensus, None
        return consensus

    def blend_teacher(self, predict: Callable[[np.ndarray, np.ndarray], np.ndarray], weight: float) -> None:
        """Mix ``predict``'s probabilities on the rows the pending targets cover (they
        share one subset and draw) into every pending target, ``(1 - weight) q + weight p``."""
        if not self.targets or weight <= 0:
            return
        subset = next(iter(self.target_subset.values()))
        rows = self.rows(subset)
        if self.holdout_fraction > 0:
            held_out = protocol.held_out_mask(self.num_reference, self.holdout_fraction,
                                              next(iter(self.target_draw.values())))
            rows = protocol.distill_rows(rows, held_out)
        teacher = np.asarray(predict(rows, self.transfer(subset)), np.float64)
        for node, q in self.targets.items():
            self.targets[node] = ((1.0 - weight) * q + weight * teacher).astype(np.float32)

    def offer_start_model(self, arrays: ArrayRecord) -> None:
        """Send ``arrays`` to each newcomer with its first instruction, from now on."""
        self.start_model = arrays

    # --- node restarts and resumed runs ---------------------------------------------------
    def rekey(self, old: int, new: int) -> None:
        """Node ``new`` now holds ``old``'s partition: it inherits its banked logits and
        pending targets (unless it has newer ones of its own)."""
        for table in (self.bank, self.bank_subset, self.bank_round, self.targets, self.target_subset,
                      self.target_draw):
            if old in table:
                value = table.pop(old)
                table.setdefault(new, value)

    def state_dict(self) -> dict[str, Any]:
        """The bank, the pending targets and the sampling state."""
        return {**super().state_dict(), "bank": self.bank, "bank_subset": self.bank_subset,
                "bank_round": self.bank_round, "targets": self.targets,
                "target_subset": self.target_subset, "target_draw": self.target_draw,
                "last_draw": self.last_draw, "started": sorted(self.started),
                "reserve_draw": self.reserve_draw}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        for name in ("bank", "bank_subset", "bank_round", "targets", "target_subset", "target_draw"):
            setattr(self, name, {int(node): value for node, value in state[name].items()})
        self.last_draw = state["last_draw"]
        self.reserve_draw = state.get("reserve_draw")
        self.started = {int(p) for p in state.get("started", [])}
