"""What crosses the wire under the market strategies, and how it is checked.

Server -> client (train): ``RecordDict{"config": ConfigRecord, "targets"?: ArrayRecord}``
with ``targets["values"]`` a float32 ``[N_ref, C]`` array (absent in a client's first
round). Client -> server: ``RecordDict{"logits": ArrayRecord, "metrics": MetricRecord}``
with ``logits["values"]`` a float32 ``[N_ref, C]`` array. Nothing else is an array.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

LOGITS = "logits"
TARGETS = "targets"
CONFIG = "config"
METRICS = "metrics"
VALUES = "values"  # the single array inside a logits/targets ArrayRecord
FINGERPRINT = "reference-fingerprint"


class InvalidPayload(ValueError):
    """A client's upload is missing, malformed, of the wrong shape or not finite."""


def pack(values: np.ndarray) -> ArrayRecord:
    """Wrap an ``[N_ref, C]`` array as a float32 ArrayRecord."""
    return ArrayRecord({VALUES: Array(np.ascontiguousarray(values, dtype=np.float32))})


def unpack(content: RecordDict, key: str, num_samples: int, num_classes: int) -> np.ndarray:
    """Read and check the ``[N_ref, C]`` array stored under ``content[key]``.

    Raises:
        InvalidPayload: naming what is wrong (missing record, shape, dtype, NaN/inf).
    """
    if key not in content.array_records:
        raise InvalidPayload(f"no '{key}' ArrayRecord in the message")
    record = content.array_records[key]
    if list(record.keys()) != [VALUES]:
        raise InvalidPayload(f"'{key}' must hold one array named '{VALUES}', got {list(record)}")
    try:
        values = record[VALUES].numpy()
    except Exception as err:  # pylint: disable=broad-except
        raise InvalidPayload(f"'{key}' array cannot be decoded: {err}") from err
    if values.shape != (num_samples, num_classes):
        raise InvalidPayload(
            f"'{key}' has shape {tuple(values.shape)}, expected {(num_samples, num_classes)}"
        )
    if not np.issubdtype(values.dtype, np.floating):
        raise InvalidPayload(f"'{key}' has dtype {values.dtype}, expected a float type")
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise InvalidPayload(f"'{key}' has {bad} NaN/inf values")
    return values.astype(np.float32, copy=False)
