"""The one interface every server strategy of ours implements, and what they all share.

:class:`NodeStrategy` is Flower's ``Strategy`` plus what the ServerApp
(:mod:`kta_flwr.server.run`) asks of every strategy, the market, the compressed-update
baselines and Flower's stock strategies (:mod:`.stock`, which wraps them) alike:

- **screening**: every reply passes its :class:`~kta_flwr.flower.validation.ReplyScreen`
  (``screen``) before anything is aggregated; subclasses say what a valid train reply
  holds (:meth:`NodeStrategy.train_spec`);
- **sampling**: wait for nodes once per round, with a deadline (:func:`wait_for_nodes`),
  then a seeded sample ordered by partition, so a resumed run samples the same partitions;
  evaluation every ``evaluate_every`` rounds and in the last;
- **which node holds which partition**, learnt from the checked replies (or asked by a
  query without arrays where an instruction depends on it,
  :meth:`NodeStrategy.learn_partitions`), so that a node that comes back under a new id
  (a restarted SuperNode, a resumed run) takes over what the strategy kept for its
  partition (:meth:`NodeStrategy.rekey`, :meth:`NodeStrategy.adopt`);
- **the lineage** (the run a resumed run continues), stamped into every instruction so
  nodes find their checkpoints of that run;
- **saved state** (:meth:`NodeStrategy.state_dict`; the server's checkpoint after every
  round) and **the round's record** (:meth:`NodeStrategy.take_round_report`: rejected
  replies, nodes' notes, the market's decisions);
- **the global model**: what ``Strategy.start`` starts from (:meth:`NodeStrategy.start_arrays`)
  and what is kept after the run (:meth:`NodeStrategy.global_model`); or, under the
  market, the consensus on the public rows the server distils its own global model from
  (:meth:`NodeStrategy.take_consensus`).

Every option is a constructor argument (:class:`NodeOptions`). What happens on each
fault: ``docs/running.md``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, NotRequired, TypedDict, Unpack

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from kta_flwr.config import evaluation_round
from kta_flwr.flower import protocol
from kta_flwr.flower.protocol import LINEAGE, RESTORE_FILE, RESTORE_REASON
from kta_flwr.flower.validation import (
    EVALUATE,
    NUM_EXAMPLES,
    QUERY,
    QUERY_METRICS,
    TRAIN,
    Checked,
    Note,
    ReplyScreen,
    ReplySpec,
    Screened,
    evaluate_metrics,
)

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]
#: Default bound of a reply's ``num-examples`` when the strategy is not told the data's size.
DEFAULT_MAX_EXAMPLES = 10**9


class FederationError(RuntimeError):
    """Too few nodes connected after ``node-wait-timeout``: the run stops."""


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float, quorum: int) -> list[int]:
    """The connected node ids, sorted, once ``min_nodes`` are connected, or after
    ``timeout`` seconds with at least ``quorum`` of them.

    Raises:
        FederationError: fewer than ``quorum`` nodes connected after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_log = 0.0
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        now = time.monotonic()
        if now >= deadline:
            if len(nodes) >= quorum:
                log(WARNING, "Waited %.0f s for %d nodes; proceeding with the %d connected "
                    "(min-round-nodes %d)", timeout, min_nodes, len(nodes), quorum)
                return nodes
            raise FederationError(
                f"only {len(nodes)} node(s) connected after {timeout:.0f} s "
                f"(run-config 'node-wait-timeout'); a round needs 'min-nodes' = {min_nodes}, "
                f"or at least 'min-round-nodes' = {quorum} after the timeout"
            )
        if now - last_log >= 10.0:
            log(INFO, "Waiting for nodes: %d connected, %d required (%.0f s left)",
                len(nodes), min_nodes, deadline - now)
            last_log = now
        time.sleep(1.0)
    return nodes


def ask_partitions(grid: Grid, nodes: list[int], server_round: int, timeout: float,
                   holders: Callable[[], dict[int, int]] | None = None) -> dict[int, int]:
    """Ask ``nodes`` which partition each holds (a query message, no arrays): node id ->
    partition id of the replies that pass the boundary checks (a partition claimed once;
    ``holders``: the known holders, :class:`~kta_flwr.flower.validation.ReplyScreen`)."""
    screen = ReplyScreen(holders)
    screen.expect(QUERY, nodes)
    config = ConfigRecord({"server-round": server_round})
    replies = grid.send_and_receive(
        [Message(RecordDict({protocol.CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY)
         for n in nodes], timeout=timeout)
    return {r.node_id: r.partition
            for r in screen.screen(server_round, QUERY, replies, ReplySpec(QUERY_METRICS)).valid}


class NodeOptions(TypedDict):
    """Keyword arguments every :class:`NodeStrategy` takes.

    Keys:
        evaluate_metrics_aggr_fn: aggregates the evaluation replies' metrics.
        train_metrics_aggr_fn: aggregates the train replies' metrics (default None: not at all).
        fraction_train: fraction of connected nodes sampled per training round (default 1).
        fraction_evaluate: fraction sampled per evaluation round (default 1).
        min_nodes: wait for this many connected nodes before sampling (default 2).
        node_wait_timeout: seconds to wait for them, once per round (default 300).
        min_round_nodes: after that, proceed with at least this many (default 1).
        seed: seeds node sampling (default 0).
        max_examples: the largest ``num-examples`` a reply may report (default 1e9; the
            ServerApp passes the size of the run's data).
        privacy_metrics: train metrics every reply must carry under DP (default none;
            :attr:`kta_flwr.config.RunConfig.privacy_metrics`).
        evaluate_every: clients evaluate every this many rounds (default 1) ...
        last_round: ... and in this round (default 0: only by ``evaluate_every``).
        lineage: the run a resumed run continues, stamped into every instruction
            (default None: a new run, nothing stamped; nodes use the run's own id).
        round_timeout: seconds to wait for the replies of a query (default 600).
        join_round: partition -> the round it joins the fleet (newcomers; default none:
            every partition from round 1). Before it, its node is neither sampled nor
            evaluated; nodes are asked their partition first (:meth:`NodeStrategy.learn_partitions`).
    """

    evaluate_metrics_aggr_fn: MetricsAggregator
    train_metrics_aggr_fn: NotRequired[MetricsAggregator | None]
    fraction_train: NotRequired[float]
    fraction_evaluate: NotRequired[float]
    min_nodes: NotRequired[int]
    node_wait_timeout: NotRequired[float]
    min_round_nodes: NotRequired[int]
    seed: NotRequired[int]
    max_examples: NotRequired[int]
    privacy_metrics: NotRequired[tuple[str, ...]]
    evaluate_every: NotRequired[int]
    last_round: NotRequired[int]
    lineage: NotRequired[int | None]
    round_timeout: NotRequired[float]
    join_round: NotRequired[dict[int, int]]


@dataclass(frozen=True)
class Consensus:
    """What the clients' uploads agree on, on public rows: the server's global model
    learns from this and the rows' inputs only (:mod:`kta_flwr.server.global_model`)."""

    #: ``[M]`` indices into the public reference set.
    rows: np.ndarray
    #: ``[M, C]`` probabilities, rows sum to 1.
    targets: np.ndarray
    #: ``[T]`` indices into the unlabeled transfer set (none without one).
    transfer_rows: np.ndarray = field(default_factory=lambda: np.arange(0))
    #: ``[T, C]`` probabilities on them, rows sum to 1.
    transfer_targets: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


@dataclass
class RoundReport:
    """What a round leaves besides its metrics, for the results (:meth:`NodeStrategy.take_round_report`)."""

    #: Replies the boundary checks dropped.
    rejected: int = 0
    #: What nodes told about the state they restored (damaged checkpoints, fresh starts).
    notes: list[Note] = field(default_factory=list)
    #: The market's decisions as arrays (:mod:`kta_flwr.flower.round_log`); empty otherwise.
    decisions: dict[str, np.ndarray] = field(default_factory=dict)


class NodeStrategy(Strategy):  # pylint: disable=too-many-instance-attributes
    """Base of every server strategy of ours; takes the :class:`NodeOptions`."""

    def __init__(self, **options: Unpack[NodeOptions]) -> None:
        self.fraction_train = options.get("fraction_train", 1.0)
        self.fraction_evaluate = options.get("fraction_evaluate", 1.0)
        self.min_nodes = options.get("min_nodes", 2)
        self.node_wait_timeout = options.get("node_wait_timeout", 300.0)
        self.min_round_nodes = options.get("min_round_nodes", 1)
        self.evaluate_metrics_aggr_fn = options["evaluate_metrics_aggr_fn"]
        self.train_metrics_aggr_fn = options.get("train_metrics_aggr_fn")
        self.seed = options.get("seed", 0)
        self.max_examples = options.get("max_examples", DEFAULT_MAX_EXAMPLES)
        self.privacy_metrics = options.get("privacy_metrics", ())
        self.evaluate_every = options.get("evaluate_every", 1)
        self.last_round = options.get("last_round", 0)
        #: Stamped into every instruction: the run a resumed run continues (None: not sent).
        self.lineage = options.get("lineage")
        self.round_timeout = options.get("round_timeout", 600.0)
        #: Partition -> the round it joins (newcomers); the others are there from round 1.
        self.join_round = dict(options.get("join_round", {}))
        #: The boundary every reply passes (it checks claims against ``partition_of``).
        self.screen = ReplyScreen(holders=lambda: self.partition_of)
        self._rng = random.Random(self.seed)
        #: Node id -> the partition it reported.
        self.partition_of: dict[int, int] = {}
        #: The round whose node wait is done (a round waits once, in its first sampling).
        self._waited_round = -1

    # --- what a subclass says ---------------------------------------------------------------
    def train_spec(self, server_round: int) -> ReplySpec:
        """What a valid train reply of ``server_round`` holds (subclasses)."""
        raise NotImplementedError

    def start_arrays(self) -> ArrayRecord:
        """What ``Strategy.start`` passes to the first round: the global model where the
        strategy sends one (after a resume, the restored one); empty by default."""
        return ArrayRecord()

    def global_model(self) -> dict[str, np.ndarray] | None:
        """The final global model's tensors (state-dict names -> arrays; entries it lacks
        keep the shared model's initialisation), or None where there is none."""
        return None

    def round_decisions(self) -> dict[str, np.ndarray]:
        """The last round's decisions as arrays for the round file (the market's); taken
        once, then empty."""
        return {}

    def take_consensus(self) -> Consensus | None:
        """The last round's consensus of the uploaded predictions on public rows (the
        market's, when asked for it); taken once. None where there is none."""
        return None

    def offer_start_model(self, arrays: ArrayRecord) -> None:
        """The model a newcomer may start from (``newcomer-start = "global"``: the server's
        global model under the market, handed over after every round). Strategies whose
        nodes all receive a global model anyway ignore it."""

    def blend_teacher(self, predict: Callable[[np.ndarray, np.ndarray], np.ndarray], weight: float) -> None:
        """Mix one more teacher into the targets waiting to be sent: each becomes
        ``(1 - weight) q + weight p`` with ``p = predict(reference rows, transfer rows)``
        (``[M + T, C]`` probabilities on the rows those targets cover; under the market
        the server's global model, ``server-model-teacher-weight``). Strategies without
        targets ignore it."""

    # --- the round's record -----------------------------------------------------------------
    def take_round_report(self) -> RoundReport:
        """Rejected replies, nodes' notes and decisions since the last call."""
        screened = self.screen.drain()
        for note in screened.notes:
            log(WARNING, "node %d (partition %d), %s: restored %s: %s", note.node_id,
                note.partition, note.kind, note.notes.get(RESTORE_FILE, "?"),
                note.notes.get(RESTORE_REASON, ""))
        return RoundReport(screened.rejected, screened.notes, self.round_decisions())

    # --- which node holds which partition --------------------------------------------------
    def observe(self, reply: Checked) -> None:
        """Note the partition a checked reply's sender holds (:meth:`note_holder`)."""
        self.note_holder(reply.node_id, reply.partition)

    def note_holder(self, node_id: int, partition: int) -> None:
        """Node ``node_id`` holds ``partition``; if another node id held it before, move
        what the strategy kept for that id to this one."""
        for old, held in list(self.partition_of.items()):
            if held == partition and old != node_id:
                log(INFO, "partition %d moved from node %d to node %d", partition, old, node_id)
                del self.partition_of[old]
                self.rekey(old, node_id)
        self.partition_of[node_id] = partition

    def rekey(self, old: int, new: int) -> None:
        """Move what is kept for node ``old`` to node ``new`` (subclasses extend it)."""

    def learn_partitions(self, grid: Grid, nodes: list[int], server_round: int) -> list[int]:
        """For strategies whose instruction depends on the node's partition (HeteroFL's
        sub-model of its tier, the common FedAvg's members): ask those of ``nodes`` whose
        partition is not known yet (:func:`ask_partitions`). Returns the nodes whose
        partition is known (a node that does not answer sits the round out)."""
        unknown = [n for n in nodes if n not in self.partition_of]
        if unknown:
            found = ask_partitions(grid, unknown, server_round, self.round_timeout,
                                   holders=lambda: self.partition_of)
            for node_id, partition in sorted(found.items()):
                self.note_holder(node_id, partition)
        return [n for n in nodes if n in self.partition_of]

    def sample_known(self, grid: Grid, fraction: float, kind: str, server_round: int) -> list[int]:
        """:meth:`sample`, then :meth:`learn_partitions`: the sampled nodes whose partition
        is known, which the screen expects ``kind`` replies from."""
        nodes = self.learn_partitions(grid, self.sample(grid, fraction, kind, server_round), server_round)
        self.screen.expect(kind, nodes)
        return nodes

    def adopt(self, partition_of: dict[int, int]) -> None:
        """A resumed run: the strategy's state names the nodes of the earlier run; map
        them to the nodes that now hold their partitions (``partition_of``: new node id ->
        partition)."""
        by_partition = {p: n for n, p in self.partition_of.items()}
        self.partition_of = {}
        for new, partition in sorted(partition_of.items()):
            old = by_partition.get(partition)
            if old is not None and old != new:
                self.rekey(old, new)
            self.partition_of[new] = partition

    # --- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly (subclasses extend it); numbers,
        strings, containers and numpy arrays only (:mod:`kta_flwr.storage.tree`)."""
        return {"rng": self._rng.getstate(), "partition_of": dict(self.partition_of)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._rng.setstate(state["rng"])
        self.partition_of = {int(n): int(p) for n, p in state["partition_of"].items()}

    # --- sampling, stamping ----------------------------------------------------------------
    def evaluates_in(self, server_round: int) -> bool:
        """True if clients evaluate in ``server_round``."""
        return evaluation_round(server_round, self.evaluate_every, self.last_round)

    def present_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """The connected nodes, sorted by partition where known: the round's first call
        waits for ``min_nodes`` (at most ``node_wait_timeout``, :func:`wait_for_nodes`),
        later calls of the same round take the nodes present (a node that never comes
        back costs one wait per round, not one per phase)."""
        if server_round != self._waited_round:
            nodes = wait_for_nodes(grid, self.min_nodes, self.node_wait_timeout, self.min_round_nodes)
            self._waited_round = server_round
        else:
            nodes = sorted(grid.get_node_ids())
            if not nodes:
                raise FederationError(f"round {server_round}: no node is connected any more")
        if self.join_round:  # newcomers are not there before their round
            nodes = [n for n in self.learn_partitions(grid, nodes, server_round)
                     if self.joins_in(n) <= server_round]
        nodes.sort(key=lambda n: (self.partition_of.get(n, 1 << 62), n))
        return nodes

    def joins_in(self, node_id: int) -> int:
        """The round node ``node_id``'s partition joins the fleet (1 unless a newcomer's)."""
        return self.join_round.get(self.partition_of.get(node_id, -1), 1)

    def sample(self, grid: Grid, fraction: float, kind: str, server_round: int) -> list[int]:
        """A seeded sample of ``fraction`` of the present nodes (at least one,
        :meth:`present_nodes`); the screen expects their ``kind`` replies."""
        nodes = self.present_nodes(grid, server_round)
        size = max(1, int(round(len(nodes) * fraction)))
        sampled = sorted(self._rng.sample(nodes, size))
        self.screen.expect(kind, sampled)
        return sampled

    def stamp(self, config: ConfigRecord, server_round: int, **extra: str) -> ConfigRecord:
        """A copy of ``config`` with the round number, the lineage and ``extra`` entries."""
        stamped = ConfigRecord(dict(config))
        stamped["server-round"] = server_round
        if self.lineage is not None:
            stamped[LINEAGE] = self.lineage
        stamped.update(extra)
        return stamped

    def own_model_evaluations(self, server_round: int, config: ConfigRecord, grid: Grid,
                              **extra: str) -> list[Message]:
        """Evaluation instructions without arrays (each sampled node evaluates its own
        model; the config stamped with ``extra``), in the rounds :meth:`evaluates_in` names."""
        if not self.evaluates_in(server_round):
            return []
        stamped = self.stamp(config, server_round, **extra)
        return [Message(RecordDict({protocol.CONFIG: stamped}), dst_node_id=node_id,
                        message_type=MessageType.EVALUATE)
                for node_id in self.sample(grid, self.fraction_evaluate, EVALUATE, server_round)]

    # --- replies -----------------------------------------------------------------------
    def screen_train(self, server_round: int, replies: Iterable[Message]) -> Screened:
        """The round's train replies through the screen; senders noted (:meth:`observe`)."""
        screened = self.screen.screen(server_round, TRAIN, replies, self.train_spec(server_round))
        for reply in screened.valid:
            self.observe(reply)
        return screened

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the evaluation metrics of the valid replies."""
        spec = ReplySpec(evaluate_metrics(self.max_examples))
        valid = self.screen.screen(server_round, EVALUATE, replies, spec).valid
        for reply in valid:
            self.observe(reply)
        contents = [reply.msg.content for reply in valid]
        return self.evaluate_metrics_aggr_fn(contents, NUM_EXAMPLES) if contents else None

    def train_metrics(self, screened: Screened) -> MetricRecord:
        """``replies`` (valid) and ``dropped`` (errors and rejected) counts plus the
        aggregated train metrics of the valid replies."""
        contents = [reply.msg.content for reply in screened.valid]
        metrics = MetricRecord({"replies": len(screened.valid),
                                "dropped": len(screened.errors) + len(screened.rejected)})
        if self.train_metrics_aggr_fn is not None and contents:
            metrics.update(self.train_metrics_aggr_fn(contents, NUM_EXAMPLES))
        return metrics


