"""The Gaussian mechanism on a client's uploaded logits (``logit-noise``), in numpy.

A client's ``[M, C]`` reference logits are centred per row (softmax unchanged) and each
row clipped to L2 norm ``clip`` (c), so any two payloads a client could send differ by at
most ``2 c sqrt(M)`` in L2 norm, whatever its data: that is the mechanism's sensitivity
to replacing *all* of the client's data. Noise ``N(0, (z * 2 c sqrt(M))²)`` per entry
then makes each upload a Gaussian mechanism with noise multiplier z (ε by the RDP
accountant, composed over the rounds a client uploads: ``kta_flwr.client.privacy``).
"""

from __future__ import annotations

import math

import numpy as np

#: The noise stays below this many standard deviations (per entry, ~1e-88 beyond).
_NOISE_SIGMAS = 20.0


def logit_noise_std(noise: float, clip: float, num_rows: int) -> float:
    """Std of the noise on each entry of an ``[num_rows, C]`` payload: ``2 z c sqrt(M)``."""
    return 2.0 * noise * clip * math.sqrt(num_rows)


def noisy_logits(logits: np.ndarray, noise: float, clip: float, rng: np.random.Generator) -> np.ndarray:
    """``[M, C]`` logits centred per row, each row clipped to L2 norm ``clip``, plus
    Gaussian noise of std :func:`logit_noise_std` per entry (float32)."""
    centred = logits - logits.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    clipped = centred * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    std = logit_noise_std(noise, clip, len(logits))
    return (clipped + rng.normal(0.0, std, size=logits.shape)).astype(np.float32)


def noisy_logit_bound(noise: float, clip: float, num_rows: int, honest_bound: float) -> float:
    """The largest centred logit an honest client's upload can hold: ``honest_bound``
    without noise, else the clip plus twice :data:`_NOISE_SIGMAS` noise stds (centring
    adds the row's mean noise)."""
    if noise <= 0:
        return honest_bound
    return max(honest_bound, clip + 2 * _NOISE_SIGMAS * logit_noise_std(noise, clip, num_rows))
