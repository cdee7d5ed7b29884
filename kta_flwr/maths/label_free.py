"""Teacher quality without labels: the market's unlabeled mode (``reference-labels =
none``), pure numpy. The method in words, its measured cost and what it does not defend:
``docs/method.md#the-unlabeled-mode``.

Notation as in :mod:`kta_flwr.maths.market`: K clients, N public rows, C classes; the
logits here are the clients' uploads, centred, with each client's class prior taken out
(what a client knows of the inputs, not its label mix).

With no labels, the others are the only evidence: client j's **pseudo-labels** are the
top classes of the mean of the *other* clients' logits, each weighted by its Sybil share
(:func:`leave_one_out_labels`: near-copies count once, and j cannot vote for itself), and
j's quality for student k is what j's prediction tells about them beyond a uniform guess,
each row weighted by k's class marginal at the row's consensus label
(:func:`agreement_information`, the label-free twin of ``market.label_information``).

Agreement with the others rewards whoever repeats them best, and a client that copies
the targets it was sent repeats them perfectly. So each client is scored only on rows it
is never sent targets on (its *reserve*, a server-side secret drawn per client, ``scored``
below): there it has nothing of the others' to copy, and its score is what its own model
knows (``tests/test_label_free.py`` ranks a good teacher above a copying one, and fails
when the reserve is removed).
"""

from __future__ import annotations

import math

import numpy as np

#: Probability floor of the log scores (as the market's).
_EPS = 1e-12
#: Clients per chunk of the leave-one-out sums (bounds the ``[chunk, N, C]`` temporaries).
_CHUNK = 32


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def consensus_labels(logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[N]``: the top class of the ``weights``-weighted (``[K]``, non-negative, not all 0)
    sum of the clients' logits ``[K, N, C]``."""
    return np.einsum("k,knc->nc", np.asarray(weights, np.float64), np.asarray(logits, np.float64)).argmax(axis=1)


def leave_one_out_labels(logits: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Each client's pseudo-labels: the top classes of the other clients' logits summed
    with their weight shares.

    Args:
        logits: ``[K, N, C]`` the clients' logits (centred, priors out, loudness capped).
        shares: ``[K]`` each client's weight share (``market.sybil_shares``), > 0.

    Returns:
        ``[K, N]`` class indices; a lone client (K = 1) gets its own top classes.
    """
    logits = np.asarray(logits)
    if logits.shape[0] == 1:
        return logits.argmax(axis=-1)
    shares = np.asarray(shares, np.float64)
    total = np.einsum("k,knc->nc", shares, logits.astype(np.float64))  # [N, C]
    out = np.empty(logits.shape[:2], dtype=np.int64)
    for start in range(0, len(logits), _CHUNK):
        part = slice(start, start + _CHUNK)
        others = total[None] - shares[part, None, None] * logits[part]
        out[part] = others.argmax(axis=-1)
    return out


def agreement_information(
    logits: np.ndarray, pseudo_labels: np.ndarray, sample_weights: np.ndarray,
    scored: np.ndarray | None = None,
) -> np.ndarray:
    """What each teacher tells each student about its pseudo-labels beyond a uniform
    guess, on the rows the teacher is scored on.

    Args:
        logits: ``[K, M, C]`` the teachers' logits (priors out) on M rows.
        pseudo_labels: ``[K, M]`` each teacher's pseudo-labels (:func:`leave_one_out_labels`).
        sample_weights: ``[K, M]`` how much each row counts for each student (its class
            marginal at the row's consensus label).
        scored: ``[K, M]`` bool, the rows each teacher is scored on (None: all).

    Returns:
        ``[K, K]`` values ``I[k, j] = max(0, sum_i w[k, i] s[j, i] log p_j(y~_j,i) /
        sum_i w[k, i] s[j, i] + log C)`` in nats; 0 where a teacher has no scored row.
    """
    log_p = _log_softmax(logits)
    picked = np.take_along_axis(log_p, np.asarray(pseudo_labels)[..., None], axis=-1)[..., 0]  # [K, M]
    picked = np.maximum(picked, math.log(_EPS))
    mask = np.ones(picked.shape) if scored is None else np.asarray(scored, np.float64)
    weights = np.asarray(sample_weights, np.float64)
    totals = weights @ mask.T  # [K(student), K(teacher)]
    score = np.divide(weights @ (mask * picked).T, totals, out=np.full(totals.shape, -np.inf),
                      where=totals > 0)
    return np.maximum(score + math.log(logits.shape[-1]), 0.0)


def agreement_rate(logits: np.ndarray, pseudo_labels: np.ndarray, scored: np.ndarray | None = None) -> np.ndarray:
    """``[K]``: how often each client's top class is its pseudo-label on its scored rows
    (``[K, M]`` bool; None: all), in [0, 1]; 0 for a client with no scored row."""
    agree = np.asarray(logits).argmax(axis=-1) == np.asarray(pseudo_labels)
    mask = np.ones(agree.shape, bool) if scored is None else np.asarray(scored, bool)
    counts = mask.sum(axis=1)
    return np.divide((agree & mask).sum(axis=1), counts, out=np.zeros(len(agree)), where=counts > 0)
