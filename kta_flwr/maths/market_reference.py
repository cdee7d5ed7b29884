"""The market's heavy computations written directly from their formulas (numpy).

Readable and slow: ``[K, N, C]`` temporaries per client and ``O(K^2 N C)`` memory
traffic per candidate. This is the implementation every market result up to v0.18 came
from; it is kept as the oracle the fast kernels (:mod:`kta_flwr.maths.market_kernels`)
are tested against (``tests/test_market_scale.py``) and as the "before" column of the
market scaling benchmark (``python -m kta_flwr.tools.market_scaling``).
"""

from __future__ import annotations

import numpy as np

from kta_flwr.maths.market import softmax
from kta_flwr.maths.market_kernels import EPS as _EPS, MarketKernels, check_divergence


def pairwise_divergence(probs: np.ndarray, kind: str = "js") -> np.ndarray:
    """Mean per-sample divergence between every pair of clients' predictions.

    Args:
        probs: ``[K, N, C]`` probability vectors.
        kind: ``"js"`` (Jensen-Shannon, in nats, bounded by ln 2), ``"skl"``
            (symmetric KL, ``(KL(p||q) + KL(q||p)) / 2``), ``"hellinger"`` (squared
            Hellinger distance ``(1/2) sum (sqrt p - sqrt q)^2``, in [0, 1]; for
            probability vectors ``ln 2 · H² <= JS <= H²``) or ``"cosine"`` (1 - cosine).

    Returns:
        ``[K, K]`` symmetric, non-negative matrix with a zero diagonal.
    """
    check_divergence(kind)
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)
    num_clients = p.shape[0]
    out = np.zeros((num_clients, num_clients))
    logp = np.log(p)
    for k in range(num_clients):
        pk, lk = p[k][None], logp[k][None]  # [1, N, C] against all clients [K, N, C]
        if kind == "js":
            m = 0.5 * (pk + p)
            logm = np.log(m)
            per = 0.5 * (pk * (lk - logm)).sum(-1) + 0.5 * (p * (logp - logm)).sum(-1)
        elif kind == "skl":
            per = 0.5 * ((pk - p) * (lk - logp)).sum(-1)
        elif kind == "hellinger":
            per = 0.5 * ((np.sqrt(pk) - np.sqrt(p)) ** 2).sum(-1)
        else:  # cosine
            dot = (pk * p).sum(-1)
            norms = np.linalg.norm(pk, axis=-1) * np.linalg.norm(p, axis=-1)
            per = 1.0 - dot / np.maximum(norms, _EPS)
        out[k] = per.mean(axis=-1)
    out = np.maximum(0.5 * (out + out.T), 0.0)
    np.fill_diagonal(out, 0.0)
    return out


def soft_targets(
    logits: np.ndarray,
    weights: np.ndarray,
    *,
    temperature: float = 1.0,
    space: str = "prob",
    priors: np.ndarray | None = None,
) -> np.ndarray:
    """Personalized soft targets ``[K, N, C]`` (float32, rows sum to 1).

    Args:
        logits: ``[J, N, C]`` teacher logits, the K students first (J = K: the clients).
        weights: ``[K, J]`` teacher weights (rows sum to 1).
        temperature: softening temperature ``T``.
        space: ``"prob"`` mixes softened probabilities; ``"logit"`` mixes logits, then
            applies a softmax at ``T``.
        priors: ``[J, C]`` class priors (:func:`class_prior`) to swap each teacher's prior
            for its student's; None mixes the predictions as they are.
    """
    w = np.asarray(weights, dtype=np.float64)
    z = np.asarray(logits, np.float64)
    log_prior = None if priors is None else np.log(np.asarray(priors, np.float64))
    if space == "prob":
        if log_prior is None:
            targets = np.einsum("kj,jnc->knc", w, softmax(z, temperature))
        else:  # each teacher's logits shifted to student k's prior, per student
            targets = np.stack([
                np.einsum("j,jnc->nc", w[k], softmax(z - log_prior[:, None] + log_prior[k], temperature))
                for k in range(len(w))
            ])
    elif space == "logit":
        mixed = np.einsum("kj,jnc->knc", w, z)
        if log_prior is not None:
            mixed += (log_prior[:len(w), None, :] - (w @ log_prior)[:, None, :])
        targets = softmax(mixed, temperature)
    else:
        raise ValueError(f"unknown target space {space!r}; use prob or logit")
    targets = np.clip(targets, 0.0, None)
    targets /= targets.sum(axis=-1, keepdims=True)
    return targets.astype(np.float32)


def label_probability(
    logits: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    *,
    space: str = "prob",
    priors: np.ndarray | None = None,
) -> np.ndarray:
    """``[G, K, M]`` probability of the true label under each candidate's targets at
    T = 1 (the float32 targets of :func:`soft_targets`, as the market always scored)."""
    picked = [
        np.take_along_axis(
            soft_targets(logits, w, temperature=1.0, space=space, priors=priors),
            np.asarray(labels)[None, :, None], axis=-1,
        )[..., 0]
        for w in weights
    ]
    return np.stack(picked).astype(np.float64)


REFERENCE = MarketKernels(pairwise_divergence, soft_targets, label_probability)
