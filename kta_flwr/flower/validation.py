"""The server's boundary: every reply a client sends is checked here, once, before any
aggregation, by every strategy (ours and Flower's stock ones, :mod:`.strategies.stock`).

A reply passes :meth:`ReplyScreen.screen` only if

- its sender was sent an instruction of this kind this round, and has not answered yet;
- it holds exactly the records the strategy expects (``metrics`` and, for train replies,
  the strategy's array record), and no other but an optional ``notes`` ConfigRecord of
  short printable strings (:data:`~kta_flwr.flower.protocol.NOTE_KEYS`: the checkpoint
  a node restored, and why);
- every metric is a finite scalar within its documented bounds (:data:`TRAIN_METRICS`,
  :data:`EVALUATE_METRICS`): accuracies in [0, 1], ``num-examples`` a positive integer no
  larger than the run's data, seconds and losses non-negative and bounded; no unknown key;
- its ``partition-id`` is the one the node reported before (if any), and no other reply
  of the same round claims it (if several do, only the partition's known holder passes);
- its arrays pass the strategy's checker (names, shapes, dtypes, finite values within
  :data:`MAX_CENTRED_LOGIT` / :data:`MAX_PARAMETER`, at most k Top-k entries, SVD rank
  at most the tensor's).

A reply that fails is dropped with one warning naming the node and the field, and
counted (:meth:`ReplyScreen.drain`, shown as ``failed`` in the per-round line); the round
goes on with the others. An error reply (the node failed, or was lost: the grid
attributes the SuperLink's "node unavailable" answer to it) is counted once, by the byte
meter, and the warning names the node. The threat model and the market's own defences: ``docs/robustness.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import log

from kta_flwr.flower.protocol import METRICS, NOTE_KEYS, NOTES, PARTITION_ID
from kta_flwr.flower.timing import EVALUATE_PHASES, PREFIX, TRAIN_PHASES

NUM_EXAMPLES = "num-examples"
#: Largest magnitude of a centred logit (``z - mean_c z``) a client may upload; honest
#: models stay far below it (a ratio of e^100 between two classes).
MAX_CENTRED_LOGIT = 100.0
#: Largest magnitude of a float model parameter or update value a client may upload.
MAX_PARAMETER = 1e4
#: Bounds of seconds, losses and norms a client reports.
MAX_SECONDS = 1e6
MAX_LOSS = 1e6
#: Largest partition id (a fleet of a million nodes).
MAX_PARTITION = 1_000_000
#: Largest ε a client may report spent.
MAX_EPSILON = 1e6
#: Longest ``notes`` string a reply may carry.
MAX_NOTE = 400

TRAIN = "train"
EVALUATE = "evaluate"
QUERY = "query"


class InvalidReply(ValueError):
    """A reply breaks the protocol; ``field`` names what (a record, array or metric)."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {problem}")


@dataclass(frozen=True)
class Rule:
    """A metric's bounds: ``low <= value <= high``; ``integer``: a whole number."""

    low: float
    high: float
    integer: bool = False

    def check(self, key: str, value: Any) -> float:
        """``value`` as a float, or :class:`InvalidReply` naming ``key``."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidReply(f"metric '{key}'", f"must be a number, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number):
            raise InvalidReply(f"metric '{key}'", f"must be finite, got {number}")
        if not self.low <= number <= self.high:
            raise InvalidReply(f"metric '{key}'", f"{number:g} is outside [{self.low:g}, {self.high:g}]")
        if self.integer and not number.is_integer():
            raise InvalidReply(f"metric '{key}'", f"must be a whole number, got {number:g}")
        return number


@dataclass(frozen=True)
class MetricSchema:
    """The metrics a reply must carry (``required``) and may carry (``optional``)."""

    required: Mapping[str, Rule]
    optional: Mapping[str, Rule] = field(default_factory=dict)

    def check(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The checked metrics as floats.

        Raises:
            InvalidReply: a missing or unknown key, or a value out of bounds.
        """
        missing = sorted(set(self.required) - set(metrics))
        if missing:
            raise InvalidReply(f"metric '{missing[0]}'", "is missing")
        unknown = sorted(set(metrics) - set(self.required) - set(self.optional))
        if unknown:
            raise InvalidReply(f"metric '{unknown[0]}'", "is not a metric of this reply")
        rules = {**self.optional, **self.required}
        return {key: rules[key].check(key, value) for key, value in metrics.items()}


def _seconds(phases: Iterable[str]) -> dict[str, Rule]:
    return {PREFIX + phase: Rule(0.0, MAX_SECONDS) for phase in phases}


#: Train metrics every client sends: examples, partition, stage-1 loss, samples, seconds.
TRAIN_ALWAYS = (NUM_EXAMPLES, PARTITION_ID, "train-loss", "samples",
                *(PREFIX + p for p in ("setup", "restore", "stage1", "save")))


def train_metrics(
    max_examples: int, optional: Iterable[str] = (), required: Iterable[str] = ()
) -> MetricSchema:
    """Schema of a train reply's metrics: :data:`TRAIN_ALWAYS` and ``required`` (the run's
    privacy metrics, ``dp-epsilon`` and ``logit-epsilon`` when on) plus the ``optional``
    keys a family's client sends only in some rounds or setups (e.g. ``distill-loss``
    when it had targets); with none, every reply has the same keys (Flower's stock
    strategies need that)."""
    rules = {
        NUM_EXAMPLES: Rule(1, max_examples, integer=True),
        PARTITION_ID: Rule(0, MAX_PARTITION, integer=True),
        "train-loss": Rule(0.0, MAX_LOSS),
        "distill-loss": Rule(0.0, MAX_LOSS),
        "residual-norm": Rule(0.0, MAX_PARAMETER * 1e6),
        "samples": Rule(0, 1e15, integer=True),
        "dp-epsilon": Rule(0.0, MAX_EPSILON),
        "dp-lifetime-epsilon": Rule(0.0, MAX_EPSILON),
        "logit-epsilon": Rule(0.0, MAX_EPSILON),
        **_seconds(TRAIN_PHASES),
    }
    return MetricSchema({k: rules[k] for k in (*TRAIN_ALWAYS, *required)},
                        {k: rules[k] for k in optional})


def evaluate_metrics(max_examples: int) -> MetricSchema:
    """Schema of an evaluation reply's metrics."""
    return MetricSchema({
        "personalized-accuracy": Rule(0.0, 1.0),
        "global-accuracy": Rule(0.0, 1.0),
        "test-loss": Rule(0.0, MAX_LOSS),
        NUM_EXAMPLES: Rule(1, max_examples, integer=True),
        PARTITION_ID: Rule(0, MAX_PARTITION, integer=True),
        **_seconds(EVALUATE_PHASES),
    })


#: Schema of a query reply (which partition a node holds).
QUERY_METRICS = MetricSchema({PARTITION_ID: Rule(0, MAX_PARTITION, integer=True)})

#: Checks one ArrayRecord and returns what the strategy aggregates from it.
ArrayChecker = Callable[[ArrayRecord], Any]


@dataclass(frozen=True)
class ReplySpec:
    """What a valid reply holds: its metric schema and, per array-record name, a checker
    (``arrays``; or ``arrays_of``, node id -> checkers, where what is valid depends on the
    sender, e.g. HeteroFL's sub-model of the sender's tier)."""

    metrics: MetricSchema
    arrays: Mapping[str, ArrayChecker] = field(default_factory=dict)
    arrays_of: Callable[[int], Mapping[str, ArrayChecker]] | None = None

    def checkers(self, node_id: int) -> Mapping[str, ArrayChecker]:
        """The array checkers of a reply from ``node_id``."""
        return self.arrays if self.arrays_of is None else self.arrays_of(node_id)


@dataclass(eq=False)
class Checked:
    """A reply that passed: its sender, message, checked metrics and checked arrays."""

    node_id: int
    msg: Message
    metrics: dict[str, float]
    arrays: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def partition(self) -> int:
        """The partition the sender holds."""
        return int(self.metrics[PARTITION_ID])


@dataclass(frozen=True)
class Note:
    """What a node told about its state (a reply's ``notes``), with who told it."""

    node_id: int
    partition: int
    kind: str  # "train" or "evaluate"
    notes: Mapping[str, str]


@dataclass
class ScreenReport:
    """What the screen saw since the last :meth:`ReplyScreen.drain`: replies it dropped,
    and the notes of those it passed."""

    rejected: int = 0
    notes: list[Note] = field(default_factory=list)


@dataclass
class Screened:
    """One round's replies, sorted: ``valid``; ``errors`` (node ids of error replies);
    ``rejected`` (node ids of sampled senders whose reply was invalid)."""

    valid: list[Checked] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)

    @property
    def answered(self) -> set[int]:
        """The asked nodes that replied this round, validly or not."""
        return {c.node_id for c in self.valid} | set(self.errors) | set(self.rejected)


class ReplyScreen:
    """The boundary of one strategy: who was asked what, and the checks of each reply.

    Args:
        holders: the strategy's current view of which node holds which partition (node
            id -> partition); a known node must keep reporting its partition, and a
            partition two nodes claim in one round goes to its known holder (neither,
            if it has none among them).
    """

    def __init__(self, holders: Callable[[], Mapping[int, int]] | None = None) -> None:
        self._asked: dict[str, set[int]] = {}
        self._report = ScreenReport()
        self._holders = holders or dict

    def expect(self, kind: str, node_ids: Iterable[int]) -> None:
        """This round's ``kind`` instructions went to ``node_ids``."""
        self._asked[kind] = set(node_ids)

    def drain(self) -> ScreenReport:
        """Replies rejected, and notes passed, since the last call."""
        report, self._report = self._report, ScreenReport()
        return report

    def screen(
        self, server_round: int, kind: str, replies: Iterable[Message], spec: ReplySpec
    ) -> Screened:
        """Check each reply against ``spec``; log and count every one dropped."""
        asked = self._asked.pop(kind, set())
        out = Screened()
        seen: set[int] = set()
        passed: list[Checked] = []
        holders = dict(self._holders())

        def drop(node_id: int, first: bool, err: InvalidReply) -> None:
            self._report.rejected += 1
            if first:
                out.rejected.append(node_id)
            log(WARNING, "round %d: dropping %s reply of node %d: %s", server_round, kind, node_id, err)

        for msg in replies:
            node_id = msg.metadata.src_node_id
            first = node_id in asked and node_id not in seen
            try:
                if node_id not in asked:
                    raise InvalidReply("sender", f"node {node_id} was not sent a {kind} instruction this round")
                if node_id in seen:
                    raise InvalidReply("sender", f"a second {kind} reply from node {node_id}")
                seen.add(node_id)
                if msg.has_error():
                    out.errors.append(node_id)
                    held = f" (partition {holders[node_id]})" if node_id in holders else ""
                    log(WARNING, "round %d: %s failed on node %d%s: %s", server_round, kind,
                        node_id, held, msg.error.reason)
                    continue
                checked = _check(node_id, msg, spec)
                if node_id in holders and holders[node_id] != checked.partition:
                    raise InvalidReply(f"metric '{PARTITION_ID}'", f"node {node_id} holds partition "
                                       f"{holders[node_id]}, not {checked.partition}")
            except InvalidReply as err:
                drop(node_id, first, err)
                continue
            passed.append(checked)
        claims: dict[int, list[Checked]] = {}
        for checked in passed:
            claims.setdefault(checked.partition, []).append(checked)
        for partition, claimants in claims.items():
            if len(claimants) == 1:
                out.valid.append(claimants[0])
                continue
            rightful = [c for c in claimants if holders.get(c.node_id) == partition]
            for checked in claimants:
                if checked in rightful:
                    out.valid.append(checked)
                else:
                    others = sorted(c.node_id for c in claimants if c is not checked)
                    drop(checked.node_id, True, InvalidReply(
                        f"metric '{PARTITION_ID}'", f"partition {partition} is also claimed this "
                        f"round by node(s) {others}" + (f", its holder {rightful[0].node_id}" if rightful else "")))
        out.valid.sort(key=lambda c: passed.index(c))
        self._report.notes.extend(Note(c.node_id, c.partition, kind, c.notes)
                                  for c in out.valid if c.notes)
        return out


def _check(node_id: int, msg: Message, spec: ReplySpec) -> Checked:
    """One reply's content against ``spec``."""
    if not msg.has_content():
        raise InvalidReply("content", "the reply carries neither content nor an error")
    content: RecordDict = msg.content
    unexpected_config = sorted(set(content.config_records) - {NOTES})
    if unexpected_config:
        raise InvalidReply(f"record '{unexpected_config[0]}'", "no such config record is expected")
    checkers = spec.checkers(node_id)
    unexpected = sorted(set(content.array_records) - set(checkers))
    if unexpected:
        raise InvalidReply(f"record '{unexpected[0]}'", "is not an array record of this reply")
    missing = sorted(set(checkers) - set(content.array_records))
    if missing:
        raise InvalidReply(f"record '{missing[0]}'", "is missing")
    extra = sorted(set(content.metric_records) - {METRICS})
    if extra:
        raise InvalidReply(f"record '{extra[0]}'", "is not a metric record of this reply")
    if METRICS not in content.metric_records:
        raise InvalidReply(f"record '{METRICS}'", "is missing")
    metrics = spec.metrics.check(content.metric_records[METRICS])
    arrays = {}
    for name, check in checkers.items():
        try:
            arrays[name] = check(content.array_records[name])
        except InvalidReply:
            raise
        except Exception as err:  # pylint: disable=broad-except  # a reply never crashes the server
            raise InvalidReply(f"record '{name}'", f"cannot be read ({type(err).__name__}: {err})") from None
    notes = _check_notes(content.config_records[NOTES]) if NOTES in content.config_records else {}
    return Checked(node_id, msg, metrics, arrays, notes)


def _check_notes(record: Mapping[str, Any]) -> dict[str, str]:
    """A reply's ``notes``: known keys, short printable strings (they reach the logs)."""
    unknown = sorted(set(record) - set(NOTE_KEYS))
    if unknown:
        raise InvalidReply(f"note '{unknown[0]}'", f"is not a note; notes are {list(NOTE_KEYS)}")
    for key, value in record.items():
        if not isinstance(value, str):
            raise InvalidReply(f"note '{key}'", f"must be a string, got {type(value).__name__}")
        if len(value) > MAX_NOTE or not value.isprintable():
            raise InvalidReply(f"note '{key}'", f"must be printable and at most {MAX_NOTE} characters")
    return {key: str(value) for key, value in record.items()}


def numpy_arrays(record: ArrayRecord, name: str) -> dict[str, np.ndarray]:
    """The arrays of ``record`` as numpy, or :class:`InvalidReply` naming record ``name``."""
    try:
        return {key: array.numpy() for key, array in record.items()}
    except Exception as err:  # pylint: disable=broad-except
        raise InvalidReply(f"record '{name}'", f"arrays cannot be decoded: {err}") from None


def check_bounded(values: np.ndarray, bound: float, what: str) -> None:
    """Finite values of magnitude at most ``bound``, or :class:`InvalidReply`."""
    if values.size and not np.isfinite(values).all():
        raise InvalidReply(what, f"holds {int((~np.isfinite(values)).sum())} NaN/inf values")
    if values.size and float(np.abs(values).max()) > bound:
        raise InvalidReply(what, f"holds values of magnitude {float(np.abs(values).max()):.3g} "
                           f"> {bound:g}")


def like_model(template: Mapping[str, np.ndarray], name: str = "arrays") -> ArrayChecker:
    """Checker of a dense model record: the template's array names, shapes and dtypes;
    float values finite and within :data:`MAX_PARAMETER`."""
    expected = {key: (tuple(arr.shape), np.dtype(arr.dtype)) for key, arr in template.items()}

    def check(record: ArrayRecord) -> ArrayRecord:
        if sorted(record.keys()) != sorted(expected):
            missing = sorted(set(expected) - set(record.keys()))
            extra = sorted(set(record.keys()) - set(expected))
            raise InvalidReply(f"record '{name}'", f"arrays differ from the model's "
                               f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for key, array in numpy_arrays(record, name).items():
            shape, dtype = expected[key]
            if array.shape != shape or array.dtype != dtype:
                raise InvalidReply(f"array '{name}/{key}'", f"is {array.dtype}{list(array.shape)}, "
                                   f"the model's is {dtype}{list(shape)}")
            if np.issubdtype(dtype, np.floating):
                check_bounded(array, MAX_PARAMETER, f"array '{name}/{key}'")
        return record

    return check
