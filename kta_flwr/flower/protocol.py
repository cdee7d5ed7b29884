"""What crosses the wire under the market strategies, and how it is checked.

Server -> client (train): ``RecordDict{"config": ConfigRecord, "targets"?: ArrayRecord}``,
the client's soft targets ``[N_ref, C]`` (absent in its first round). Client -> server:
``RecordDict{"logits": ArrayRecord, "metrics": MetricRecord}``, its logits ``[N_ref, C]``.
Both ArrayRecords hold the arrays of the run's codec (:mod:`kta_flwr.maths.knowledge_codec`; float32:
one ``"values"`` array). Nothing else is an array.

With ``reference-fraction`` < 1 only a rotating subset of the reference rows crosses the
wire each round (:func:`reference_subset`): the instruction's config names the subset the
client uploads logits for (``logits-subset``, used by the next round's targets) and the
subset its targets cover (``targets-subset``); both sides derive the rows from the run's
seed, so no index is sent.

Under the adaptive market a fixed, seeded share of the reference rows is **held out**
(:func:`held_out_mask`): clients upload logits there but never distill on them, so the
market can judge its candidate targets on honest predictions; targets cover only the
other rows (:func:`distill_rows`).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from kta_flwr.maths.knowledge_codec import Codec, CodecError, decode, encode

LOGITS = "logits"
TARGETS = "targets"
CONFIG = "config"
METRICS = "metrics"
VALUES = "values"  # the single array of a float32 payload
FINGERPRINT = "reference-fingerprint"
LOGITS_SUBSET = "logits-subset"
TARGETS_SUBSET = "targets-subset"
#: Instruction config: the run a resumed run continues (absent: the run itself).
LINEAGE = "lineage"
#: Reply metric: the partition the node holds.
PARTITION_ID = "partition-id"
#: Optional reply ConfigRecord: what a node has to tell about the state it restored
#: (:data:`NOTE_KEYS`; short strings, checked by :mod:`kta_flwr.flower.validation`).
NOTES = "notes"
#: ``notes`` keys: the checkpoint file a node restored its state from ("none": it started
#: fresh) and why, when that is not what the run expects (a damaged file, nothing found).
RESTORE_FILE, RESTORE_REASON = "restore-file", "restore-reason"
NOTE_KEYS = (RESTORE_FILE, RESTORE_REASON)
#: What the rows under each key are, for the codecs.
KIND = {LOGITS: "logits", TARGETS: "probs"}


class InvalidPayload(ValueError):
    """A client's upload is missing, malformed, of the wrong shape or not finite."""


def pack(values: np.ndarray, codec: Codec = Codec(), key: str = LOGITS) -> ArrayRecord:
    """Encode ``[N_ref, C]`` rows (logits or targets, by ``key``) as an ArrayRecord."""
    payload = encode(values, codec, KIND[key])
    return ArrayRecord({name: Array(np.ascontiguousarray(arr)) for name, arr in payload.items()})


def unpack(
    content: RecordDict, key: str, num_samples: int, num_classes: int, codec: Codec = Codec()
) -> np.ndarray:
    """Decode and check the ``[N_ref, C]`` rows stored under ``content[key]`` (float32).

    Raises:
        InvalidPayload: naming what is wrong (missing record, array names, shape, dtype,
            NaN/inf).
    """
    if key not in content.array_records:
        raise InvalidPayload(f"no '{key}' ArrayRecord in the message")
    return decode_record(content.array_records[key], key, num_samples, num_classes, codec)


def decode_record(
    record: ArrayRecord, key: str, num_samples: int, num_classes: int, codec: Codec = Codec()
) -> np.ndarray:
    """Decode and check the ``[N_ref, C]`` rows of ``record`` (``key``: what they are).

    Raises:
        InvalidPayload: as :func:`unpack`.
    """
    try:
        payload = {name: array.numpy() for name, array in record.items()}
    except Exception as err:  # pylint: disable=broad-except
        raise InvalidPayload(f"'{key}' arrays cannot be decoded: {err}") from err
    try:
        rows = decode(payload, num_samples, num_classes, codec, KIND[key])
    except CodecError as err:
        raise InvalidPayload(f"'{key}' ({codec.name}): {err}") from None
    if KIND[key] == "probs" and codec.name != "float32":  # lossy: back onto the simplex
        rows = np.clip(rows, 0.0, None)
        rows /= np.maximum(rows.sum(axis=1, keepdims=True), 1e-12)
    return rows


def reference_subset(num_reference: int, fraction: float, seed: int, subset_id: int) -> np.ndarray:
    """Sorted row indices of reference subset ``subset_id``: ``ceil(fraction * N_ref)``
    consecutive entries (cyclically) of a seeded permutation, so consecutive subsets cover
    the whole set before any row repeats. ``fraction >= 1``: every row, for every id."""
    if fraction >= 1.0:
        return np.arange(num_reference)
    size = max(1, math.ceil(fraction * num_reference))
    order = np.random.default_rng(seed).permutation(num_reference)
    return np.sort(order[(subset_id * size + np.arange(size)) % num_reference])


def held_out_mask(num_reference: int, fraction: float, seed: int) -> np.ndarray:
    """``[N_ref]`` bool: ``floor(fraction * N_ref)`` rows drawn once from the run's seed
    (the same on every node and the server); none when ``fraction`` is 0."""
    mask = np.zeros(num_reference, dtype=bool)
    size = math.floor(fraction * num_reference)
    if size > 0:
        mask[np.random.default_rng([seed, 1]).choice(num_reference, size, replace=False)] = True
    return mask


def distill_rows(rows: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """The entries of ``rows`` (reference row indices) that are not held out."""
    return rows[~held_out[rows]]
