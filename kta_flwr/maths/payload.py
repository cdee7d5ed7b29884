"""A payload: the named numpy arrays one message carries for a codec or a compressor."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: Array name -> array, as encoded (values, indices, scales or SVD factors).
Payload = dict[str, np.ndarray]


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of the payload's arrays (``numel * itemsize``, indices and scales included):
    what crosses the wire."""
    return int(sum(np.asarray(a).nbytes for a in payload.values()))
