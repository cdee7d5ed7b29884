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

With an unlabeled **transfer set** (``transfer-source``) each round also exchanges a
rotating window of ``transfer-rows`` transfer rows (:func:`transfer_window`, the same
subset id): the logits are ``[M + T, C]``, the M reference rows of the subset first, then
the T transfer rows; the targets likewise, the reference rows they cover first.

Under the adaptive market a share of the reference rows is **held out** each round
(:func:`held_out_mask`): the market scores teachers, chooses each client's τ and gates
on those rows, and the targets it computes cover only the other rows
(:func:`distill_rows`). The held-out rows are drawn *after* the round's uploads are in,
from a digest of all of them (:func:`scoring_draw`): no client can compute them before
it uploads, since they depend on the other clients' private predictions, and a run still
replays bit for bit. The instruction that carries a client's targets names the draw
(``targets-holdout``, one integer; the payload bytes are unchanged), so the client learns
which rows were scored only after the fact (``docs/robustness.md``).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from kta_flwr.maths.knowledge_codec import Codec, CodecError, decode, encode

LOGITS = "logits"
TARGETS = "targets"
CONFIG = "config"
METRICS = "metrics"
#: A dense model's record, both ways (Flower's FedAvg's ``arrayrecord_key``; HeteroFL's
#: sub-models, fedavg-common's members).
ARRAYS = "arrays"
#: A newcomer's first instruction under the market: the server's global model to start from.
START_MODEL = "start-model"
VALUES = "values"  # the single array of a float32 payload
FINGERPRINT = "reference-fingerprint"
LOGITS_SUBSET = "logits-subset"
TARGETS_SUBSET = "targets-subset"
#: Instruction config (with targets): the draw of the held-out rows the targets leave out.
TARGETS_HOLDOUT = "targets-holdout"
#: Instruction config: the run a resumed run continues (absent: the run itself).
LINEAGE = "lineage"
#: Evaluate instruction config (HeteroFL's static BatchNorm): recompute the received
#: model's BatchNorm statistics on the node's private training inputs before evaluating it.
STATIC_BATCH_NORM = "static-batch-norm"
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
    return rotating_window(num_reference, max(1, math.ceil(fraction * num_reference)), seed, subset_id)


def transfer_window(num_transfer: int, rows_per_round: int, seed: int, subset_id: int) -> np.ndarray:
    """Sorted indices of the transfer rows exchanged with subset ``subset_id``:
    :func:`rotating_window` of ``rows_per_round`` rows over a permutation seeded by
    ``(seed, 1)`` (a stream apart from the reference subsets'); none for 0 rows."""
    if rows_per_round <= 0:
        return np.arange(0)
    return rotating_window(num_transfer, rows_per_round, [seed, 1], subset_id)


def rotating_window(num_rows: int, size: int, seed: int | list[int], window_id: int) -> np.ndarray:
    """Sorted entries ``window_id * size ... + size - 1`` (cyclically) of a permutation of
    ``range(num_rows)`` seeded by ``seed``: the first ``num_rows // size`` windows hold
    no row twice, and every row is taken before any repeats."""
    order = np.random.default_rng(seed).permutation(num_rows)
    return np.sort(order[(window_id * size + np.arange(size)) % num_rows])


def held_out_mask(num_reference: int, fraction: float, draw: int | list[int]) -> np.ndarray:
    """``[N_ref]`` bool: ``floor(fraction * N_ref)`` rows (:func:`held_out_count`) drawn
    from ``draw`` (a round's :func:`scoring_draw`); none when ``fraction`` is 0."""
    mask = np.zeros(num_reference, dtype=bool)
    size = held_out_count(num_reference, fraction)
    if size > 0:
        mask[np.random.default_rng(draw).choice(num_reference, size, replace=False)] = True
    return mask


def reserve_mask(num_reference: int, fraction: float, draw: int, partition: int) -> np.ndarray:
    """``[N_ref]`` bool, the unlabeled mode's reserve of one partition: the
    :func:`held_out_mask` of ``fraction`` drawn from a market round's :func:`scoring_draw`
    (the first one, fixed for the run) and the partition id. No client can compute it: the
    draw digests every client's upload."""
    return held_out_mask(num_reference, fraction, [draw, partition, 1])


def held_out_count(num_reference: int, fraction: float) -> int:
    """How many reference rows are held out each round: ``floor(fraction * N_ref)``."""
    return math.floor(fraction * num_reference)


def scoring_draw(server_round: int, uploads: np.ndarray, previous: int | None,
                 num_reference: int, fraction: float) -> int:
    """The round's draw of held-out rows: the first 63 bits of SHA-256 over the round
    number and the bytes of every upload the market prices (``[K, M, C]``, in partition
    order), re-hashed until its :func:`held_out_mask` differs from ``previous``'s (so no
    two consecutive rounds score the same rows, when more than one set is possible)."""
    draw = _first_63_bits(np.int64(server_round).tobytes() + np.ascontiguousarray(uploads).tobytes())
    if previous is None or held_out_count(num_reference, fraction) in (0, num_reference):
        return draw
    before = held_out_mask(num_reference, fraction, previous)
    while np.array_equal(held_out_mask(num_reference, fraction, draw), before):
        draw = _first_63_bits(draw.to_bytes(8, "big"))
    return draw


def _first_63_bits(data: bytes) -> int:
    """The first 63 bits of SHA-256 of ``data``, as a non-negative int64."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> 1


def distill_rows(rows: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """The entries of ``rows`` (reference row indices) that are not held out."""
    return rows[~held_out[rows]]
