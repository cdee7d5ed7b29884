"""Exact byte accounting of what every strategy sends and receives.

:class:`MeteredGrid` wraps Flower's ``Grid``: every message the strategy pushes and every
reply it pulls is counted, per node, phase (train/evaluate) and direction, in two units:

* **payload**: the array values carried (``numel * itemsize`` of every array in every
  ArrayRecord): the paper's accounting (float32 logits = ``N_ref * C * 4`` bytes);
* **wire**: the size of the serialized ``RecordDict`` protobuf (array headers, configs and
  metrics included): what the message body costs on the gRPC link.

Counting at the grid means the stock FedAvg/FedProx strategies are metered exactly like
the market, without changing them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from kta_flwr.flower.grids import GridView, attribute_lost

UP = "up"  # client -> server
DOWN = "down"  # server -> client


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array values in ``content``: sum of ``numel * itemsize`` over all arrays."""
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            total += math.prod(array.shape) * np.dtype(array.dtype).itemsize
    return total


def wire_bytes(content: RecordDict) -> int:
    """Serialized size in bytes of ``content`` as Flower's protobuf ``RecordDict``."""
    return recorddict_to_proto(content).ByteSize()


@dataclass
class Traffic:
    """Byte counters keyed by ``(phase, direction)`` and by node."""

    payload: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    wire: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    per_node: dict[int, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: {UP: 0, DOWN: 0})
    )
    #: How many arrays of each signature crossed the wire, e.g.
    #: ``"train/up logits.values float32[300, 10]" -> 20``: an audit of what was sent.
    manifest: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sent: int = 0  # messages pushed to nodes
    failed: int = 0  # replies that carried an error, or never came back in time

    def add(self, phase: str, direction: str, node_id: int, content: RecordDict) -> None:
        """Count one message body."""
        size = payload_bytes(content)
        for record_name, record in content.array_records.items():
            for array_name, array in record.items():
                signature = f"{phase}/{direction} {record_name}.{array_name} {array.dtype}{list(array.shape)}"
                self.manifest[signature] += 1
        self.payload[(phase, direction)] += size
        self.wire[(phase, direction)] += wire_bytes(content)
        self.per_node[node_id][direction] += size

    def state(self) -> dict[str, object]:
        """The counters as plain dicts (a checkpoint)."""
        return {"payload": dict(self.payload), "wire": dict(self.wire),
                "per_node": {k: dict(v) for k, v in self.per_node.items()},
                "manifest": dict(self.manifest), "sent": self.sent, "failed": self.failed}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> Traffic:
        """Counters restored from :meth:`state`."""
        traffic = cls()
        traffic.payload.update(state["payload"])  # type: ignore[arg-type]
        traffic.wire.update(state["wire"])  # type: ignore[arg-type]
        for node, counts in state["per_node"].items():  # type: ignore[attr-defined]
            traffic.per_node[node].update(counts)
        traffic.manifest.update(state["manifest"])  # type: ignore[arg-type]
        traffic.sent, traffic.failed = int(state["sent"]), int(state["failed"])  # type: ignore[call-overload]
        return traffic

    def total(self, direction: str, phase: str | None = None, unit: str = "payload") -> int:
        """Bytes in ``direction``, for one phase or all phases."""
        table = self.payload if unit == "payload" else self.wire
        return sum(v for (p, d), v in table.items() if d == direction and phase in (None, p))


class ByteMeter:
    """Cumulative traffic plus the traffic since the last :meth:`close_round`."""

    def __init__(self) -> None:
        self.cumulative = Traffic()
        self.current = Traffic()

    def record(self, phase: str, direction: str, node_id: int, content: RecordDict) -> None:
        """Count one message in both the cumulative and the current-round counters."""
        self.cumulative.add(phase, direction, node_id, content)
        self.current.add(phase, direction, node_id, content)

    def record_outcome(self, sent: int, failed: int) -> None:
        """Count messages sent and replies that failed or timed out."""
        for traffic in (self.cumulative, self.current):
            traffic.sent += sent
            traffic.failed += failed

    def close_round(self) -> Traffic:
        """Return the traffic since the previous call and start a new round."""
        done, self.current = self.current, Traffic()
        return done


class MeteredGrid(GridView):
    """A ``Grid`` that counts the bytes of every message it sends and receives, and
    attributes the SuperLink's "node unavailable" answers to the lost node
    (:func:`~kta_flwr.flower.grids.attribute_lost`), so a lost node counts as one failure."""

    def __init__(self, inner: Grid, meter: ByteMeter) -> None:
        super().__init__(inner)
        self.meter = meter

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        messages = list(messages)
        self._count_out(messages)
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        replies = list(self._inner.pull_messages(message_ids))
        self._count_in(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send ``messages``, wait for replies (up to ``timeout`` s), count both ways."""
        messages = list(messages)
        self._count_out(messages)
        replies = attribute_lost(messages, self._inner.send_and_receive(messages, timeout=timeout))
        self._count_in(replies)
        errors = sum(msg.has_error() for msg in replies)
        self.meter.record_outcome(len(messages), errors + len(messages) - len(replies))
        return replies

    # Counting ----------------------------------------------------------------------
    def _count_out(self, messages: list[Message]) -> None:
        for msg in messages:
            self.meter.record(msg.metadata.message_type, DOWN, msg.metadata.dst_node_id, msg.content)

    def _count_in(self, replies: list[Message]) -> None:
        for msg in replies:
            if not msg.has_error():
                self.meter.record(
                    msg.metadata.message_type, UP, msg.metadata.src_node_id, msg.content
                )
