"""Keeping clients' copies of a global model in step by sending compressed updates only.

The compressed-update baselines (``fedavg-topk``, ``sapef``, ``fedkd``) never send the
dense model if they can avoid it. The global model is **versioned**: version 0 is built
from the run's seed on both sides (its hash travels with every message, so a client with
a different initialisation fails loudly), and version ``v`` is version ``v-1`` plus the
compressed aggregate of round ``v``. The server keeps the per-round aggregates its nodes
still need and the version each node holds; a message brings its node up to date with

- ``"sync"`` ConfigRecord: ``base-version``, ``version``, ``initial-hash``;
- ``"update-<v>"`` ArrayRecords, the compressed aggregates of rounds ``base+1 .. version``
  (so every client applies exactly the server's updates, bit for bit), or
- ``"global"`` ArrayRecord (``values``: float32 ``[P]``): the dense model, when that is
  cheaper, when the node's base is no longer kept, or when its state is unknown (after a
  failed round).

A client replies with ``"update"`` ArrayRecord: its compressed update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from kta_flwr.maths.payload import payload_bytes
from kta_flwr.maths.update_compression import CompressionError, UpdateCodec

SYNC = "sync"
GLOBAL = "global"
UPDATE = "update"
VALUES = "values"
UPDATE_PREFIX = "update-"
#: ``base-version`` of a message that carries the dense model.
DENSE = -1


class SyncError(ValueError):
    """A node's copy of the global model cannot be brought up to date from a message."""


def model_hash(vector: np.ndarray) -> str:
    """Short hash of a float32 ``[P]`` vector (to check that both sides built version 0
    alike)."""
    return hashlib.sha256(np.ascontiguousarray(vector, np.float32).tobytes()).hexdigest()[:16]


def to_record(payload: dict[str, np.ndarray]) -> ArrayRecord:
    """A payload as an ArrayRecord (one Array per named numpy array)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord back to a payload."""
    return {k: v.numpy() for k, v in record.items()}


class ModelLog:
    """Server side: the global model ``[P]``, its recent per-round updates, each node's
    version.

    Args:
        initial: version 0, float32 ``[P]`` (built from the run's seed).
        codec: decompresses the stored updates (to apply them to the server's copy).
    """

    def __init__(self, initial: np.ndarray, codec: UpdateCodec) -> None:
        self.vector = np.array(initial, np.float32)
        self.codec = codec
        self.version = 0
        self.initial_hash = model_hash(initial)
        #: Compressed aggregate of round v, for the v still needed by some node.
        self.updates: dict[int, dict[str, np.ndarray]] = {}
        #: Version each node holds (absent: never trained; a node in ``unknown``: dense next).
        self.held: dict[int, int] = {}
        self.unknown: set[int] = set()

    def records_for(self, node_id: int) -> dict[str, ConfigRecord | ArrayRecord]:
        """The records that bring ``node_id`` to the current version (cheapest form)."""
        base = self.held.get(node_id, 0)
        dense_bytes = self.vector.nbytes
        needed = range(base + 1, self.version + 1)
        kept = node_id not in self.unknown and all(v in self.updates for v in needed)
        if kept and sum(payload_bytes(self.updates[v]) for v in needed) < dense_bytes:
            records: dict[str, ConfigRecord | ArrayRecord] = {
                f"{UPDATE_PREFIX}{v}": to_record(self.updates[v]) for v in needed
            }
        else:
            base = DENSE
            records = {GLOBAL: to_record({VALUES: self.vector})}
        records[SYNC] = ConfigRecord(
            {"base-version": base, "version": self.version, "initial-hash": self.initial_hash}
        )
        return records

    def commit(self, payload: dict[str, np.ndarray]) -> None:
        """Apply round ``version + 1``'s compressed aggregate and keep it for the nodes
        that will need it."""
        self.vector = self.vector + self.codec.decompress(payload)
        self.version += 1
        self.updates[self.version] = payload
        self._forget_unneeded()

    def acknowledge(self, node_id: int, version: int) -> None:
        """``node_id`` replied: it now holds ``version``."""
        self.held[node_id] = version
        self.unknown.discard(node_id)

    def lost(self, node_id: int) -> None:
        """``node_id`` failed mid-round: its copy is unknown, so it gets the dense model."""
        self.unknown.add(node_id)

    def _forget_unneeded(self) -> None:
        """Drop updates older than every version a node is known to hold (version 0 is
        kept for nodes that never trained while the log is short)."""
        known = [v for n, v in self.held.items() if n not in self.unknown]
        oldest = min(known, default=self.version)
        for v in [v for v in self.updates if v <= oldest]:
            del self.updates[v]


def catch_up(
    content: RecordDict,
    held: tuple[np.ndarray, int] | None,
    initial: Callable[[], np.ndarray],
    codec: UpdateCodec,
) -> tuple[np.ndarray, int]:
    """Client side: the global model ``[P]`` and its version after applying ``content``.

    Args:
        content: the server's message (with the records :meth:`ModelLog.records_for` made).
        held: the node's stored ``(vector, version)``, or None if it has none.
        initial: builds version 0 from the run's seed.
        codec: decompresses the updates.

    Raises:
        SyncError: no sync record, a base version this node does not hold, a version-0
            hash that differs from the server's, or a malformed update.
    """
    if SYNC not in content.config_records:
        raise SyncError("the message has no 'sync' record: is the server running a "
                        "compressed-update strategy?")
    sync = content.config_records[SYNC]
    base, version = int(sync["base-version"]), int(sync["version"])
    if base == DENSE:
        if GLOBAL not in content.array_records:
            raise SyncError("dense sync message without a 'global' record")
        vector = from_record(content.array_records[GLOBAL]).get(VALUES)
        if vector is None or vector.shape != (codec.layout.size,) or vector.dtype != np.float32:
            raise SyncError(f"'global' must hold float32 'values' of shape ({codec.layout.size},)")
        return vector.copy(), version
    if base == 0:
        vector = initial()
        if model_hash(vector) != sync["initial-hash"]:
            raise SyncError(
                "this node's initial model differs from the server's (same 'models', "
                "'student-model' and 'seed' on both sides? same torch version?)"
            )
    elif held is None or held[1] != base:
        have = "nothing" if held is None else f"version {held[1]}"
        raise SyncError(f"the update starts at version {base} but this node holds {have}")
    else:
        vector = held[0]
    for v in range(base + 1, version + 1):
        key = f"{UPDATE_PREFIX}{v}"
        if key not in content.array_records:
            raise SyncError(f"missing record '{key}'")
        try:
            vector = vector + codec.decompress(from_record(content.array_records[key]))
        except CompressionError as err:
            raise SyncError(f"'{key}': {err}") from None
    return vector.astype(np.float32, copy=False), version
