"""The KTA v2 knowledge market as pure numpy functions (no Flower, no torch). The method
in words, with its defaults and measured effects: ``docs/method.md``.

Notation: K clients, N reference samples, C classes. Client k uploads logits
``z[k]`` of shape ``[N, C]`` on the labeled public reference set (labels ``y``, ``[N]``).

1. Softened predictions ``p[k, i] = softmax(z[k, i] / T)``.
2. Reference accuracy ``acc[k] = mean_i 1[argmax z[k, i] == y[i]]``.
3. Divergence ``D[k, j] = mean_i d(p[k, i], p[j, i])`` with ``d`` the Jensen-Shannon
   divergence (``js``), the symmetric KL (``skl``), the squared Hellinger distance
   (``hellinger``, ``ln 2 · H² <= JS <= H²``: one matrix product instead of a logarithm
   per pair and entry) or ``1 - cosine`` (``cosine``).
4. Similarity graph ``S[k, j] = exp(-D[k, j] / tau)`` (``S[k, k] = 1``).
5. Teacher weights ``W[k, j] ∝ S[k, j] * acc[j] ** gamma`` over the ``m`` most similar
   other clients (all when ``m = 0``). With ``self_weight = rho`` in [0, 1] the client
   keeps weight ``rho`` on itself and the others share ``1 - rho``; with
   ``self_weight = -1`` the client competes like any other teacher (``S[k, k] = 1``).
   Rows sum to 1.
6. Personalized targets ``q[k] = sum_j W[k, j] p[j]`` (``prob`` space) or
   ``softmax(sum_j W[k, j] z[j] / T)`` (``logit`` space); each row of ``q[k]`` is a
   probability distribution over the C classes.

**Teacher quality** (``teacher_quality="information"``, kta's default): ``acc[j]`` in
step 5 becomes a quality per student and teacher, the nats teacher j's prediction
(T = 1, its own class prior taken out) gives the labels of the scored (held-out) rows
beyond a uniform guess, each row weighted by the student's predicted class marginal at
its label: ``I[k, j] = max(0, sum_i pi_k(y_i) log p~_j(y_i | x_i) / sum_i pi_k(y_i) + log C)``
(:func:`label_information`). A proper score: it counts how wrong a teacher is, not only
how often; it judges each teacher on the classes the student cares about, so a
label-skewed teacher keeps its weight with the students that share its classes; and a
teacher no better than a uniform guess there gets no weight at all (an inverted or
rolled upload). With ``score_uniform_share = u`` each row weighs
``(1 - u) pi_k(y_i) + u / C`` instead (:func:`scoring_weights`; the adaptive market's
scoring below alike), so a teacher's errors on the classes a student holds little of,
where the student learns from its targets alone, count too. ``"likelihood"`` scales by
the geometric mean label probability of the uncorrected prediction instead,
``Q[k, j] = exp(sum_i pi_k(y_i) log p_j(y_i) / sum_i pi_k(y_i))`` (:func:`label_quality`),
which is never 0.

**Prior correction** (``prior_correction=True``, the default): teachers trained on other
label mixes carry their own class priors into the targets. Each client's prior is
estimated from what it already uploads, its mean predicted distribution on the reference
set ``pi_k = mean_i softmax(z[k, i])`` (at T = 1); in ``logit`` space every teacher's prior
is swapped for the student's, ``q[k] = softmax((sum_j W[k, j] (z[j] - log pi_j)
+ log pi_k) / T)`` (``prob`` space: each teacher's shifted softmax, then mixed), so the
teachers contribute what they know of the inputs and the student keeps its own label
mix (Bayes' rule under label shift, ``p(y|x) ∝ p(x|y) p(y)``).

**Adaptive market** (``adaptive=True``, the default): instead of one fixed ``tau``,
each client k gets the ``tau`` from ``tau_grid`` whose targets (at T = 1) best predict the
labels of the **held-out** reference rows (rows the clients never distill on, so their
predictions there are honest), each row weighted by k's own predicted class marginal
``pi_k(y_i)`` (so a label-skewed client judges teachers on the classes it cares about,
with no extra upload):
``tau_k = argmax_tau  L_k(q_tau[k])``, ``L_k(q) = sum_i pi_k(y_i) log q[i, y_i] / sum_i pi_k(y_i)``.
A sharp ``tau`` gives the nearest teachers, a broad one an accuracy-weighted global
teacher; the labels arbitrate. With ``gate=True`` (the default) the client's own
predictions compete too: if ``L_k(p_k)`` is at least ``L_k`` of the best mix, no teacher
has anything to sell to k this round and it gets no targets (it trains locally only, and
nothing is sent down). Cost: one weight/target computation per grid value on the
held-out rows, ``O(|grid| * K^2 * N_held * C)``, then one on the rows sent.

A FedMD-style global teacher is the same code path with uniform weights
(``weighting="uniform"``): every client gets the plain mean of all predictions.

A **KT-pFL-style** market (``weighting="learned"``) replaces step 5 by coefficients
learned on the server (:func:`learned_weights`): for each client, the row ``W[k]`` (over
the other clients) maximises the weighted log-likelihood of the reference labels under
the probability mix ``sum_j W[k, j] p[j]`` (at T = 1, with the same class-marginal sample
weights as the adaptive rule) plus a symmetric Dirichlet prior that pulls it toward
uniform with the strength of ``learn_prior`` (a fraction of the data's weight), fitted
by ``learn_steps`` EM iterations from uniform (monotone, no step size). Similarity and
accuracy play no part; targets are then formed exactly as in step 6.

**Background teacher** (``background=True``, with ``neighbours = m`` in ``logit`` space):
the teachers beyond each client's m nearest are not dropped; their share of the full
weights (step 5 over every client) goes to one background teacher, the mean of every
client's (prior-corrected) logits. In ``logit`` space that equals the dense weights
``W[k, j] = W_m[k, j] + t_k / K`` (``W_m``: the full weights on the m nearest and the
client itself, ``t_k`` the rest), at the cost of one more gathered teacher per client.

**Unlabeled mode** (``labels=None``, :mod:`kta_flwr.maths.label_free`): each teacher's
quality is its information about the leave-one-out consensus of the others, on the rows
it is scored on (``scored``, its reserve); tau and the gate follow the quality-weighted
consensus; the defences that need labels do not apply.

**Scale** (``docs/scaling.md``): the heavy steps (3, 6 and the adaptive scoring) run in
:mod:`kta_flwr.maths.market_kernels`, without ``[K, N, C]`` temporaries per client and with
the ``m`` nearest teachers gathered when ``neighbours`` is set; the direct transcription
stays in :mod:`kta_flwr.maths.market_reference` as their oracle. ``divergence_rows``
measures step 3 on that many evenly spaced rows only (an approximation, off by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kta_flwr.maths.label_free import (
    agreement_information,
    agreement_rate,
    consensus_labels,
    leave_one_out_labels,
)
from kta_flwr.maths.market_kernels import (
    EPS as _EPS,
    FAST,
    MarketKernels,
    few_teachers,
    first_true_columns,
    for_each_chunk,
    label_softmax,
    pairwise_divergence,
    row_sums,
    soft_targets,
)

#: Public names; steps 3 and 6 are the fast kernels, re-exported under the market's names.
__all__ = [
    "MarketOutput",
    "MarketParams",
    "adaptive_weights",
    "background_logits",
    "candidate_weights",
    "cap_loudness",
    "centre",
    "class_information",
    "class_prior",
    "class_weights",
    "consistent_accuracy",
    "dense_weights",
    "global_consensus",
    "label_information",
    "label_likelihood",
    "label_quality",
    "learned_weights",
    "neighbour_mask",
    "own_label_probability",
    "pairwise_divergence",
    "probabilities",
    "reference_accuracy",
    "reference_rows",
    "run_market",
    "scoring_weights",
    "similarity_graph",
    "soft_targets",
    "softmax",
    "sybil_shares",
    "teacher_weights",
    "weighted_log_likelihood",
    "with_background",
    "with_labels",
]

#: Clients per chunk when a ``[K, N, C]`` array is transformed client by client.
_CLIENT_CHUNK = 32
#: Bytes of one chunk of a multi-pass per-client step (a core's L2 cache holds it).
_CACHED_CHUNK_BYTES = 2 * 2**20


@dataclass(frozen=True)
class MarketParams:
    """Knobs of the market; see the module docstring for the formulas."""

    temperature: float = 1.0
    divergence: str = "js"
    tau: float = 0.02
    neighbours: int = 0
    self_weight: float = -1.0
    accuracy_exponent: float = 1.0
    target_space: str = "prob"
    weighting: str = "market"  # "market" (similarity x accuracy), "uniform" (FedMD), "learned" (KT-pFL)
    adaptive: bool = True  # pick tau per client from tau_grid (else use the fixed tau)
    tau_grid: tuple[float, ...] = tuple(np.geomspace(0.003, 10.0, 13).round(6))  # ascending
    tie_tolerance: float = 1e-3  # nats of weighted log-likelihood
    learn_steps: int = 100  # "learned": EM iterations per round
    learn_prior: float = 0.1  # "learned": pull toward uniform coefficients (pseudo-weight)
    prior_correction: bool = True  # swap each teacher's class prior for the student's
    gate: bool = True  # adaptive: no targets for a client its own predictions serve best
    # --- defences (docs/robustness.md); kta turns them on, FedMD and KT-pFL stay as published
    consistency: bool = False  # a teacher's accuracy: the lower of held-out and distilled rows
    # "accuracy" (acc[j], step 5), "likelihood" (Q[k, j], :func:`label_quality`: each
    # teacher's log score on the scored rows, weighted by the student's classes) or
    # "information" (I[k, j], :func:`label_information`: that score, prior taken out,
    # in nats above a uniform guess; 0 for a teacher no better than one)
    teacher_quality: str = "accuracy"
    sybil_divergence: float = 0.0  # teachers closer than this (mean JS, nats) share one weight
    loudness_cap: float = 0.0  # cap each teacher's centred logit row norm at this x the median
    # the share of each scored row's weight that is the same for every class; the rest
    # follows the student's class marginal (:func:`scoring_weights`)
    score_uniform_share: float = 0.0
    # "information" only: each target row mixes its teachers by their information on
    # the row's class (:func:`class_information`, :func:`class_weights`)
    class_quality: bool = False
    # the share of each labeled target row that is its label's one-hot (:func:`with_labels`)
    label_share: float = 0.0
    # --- scale (docs/scaling.md): 0 keeps the exact market
    divergence_rows: int = 0  # divergences on this many evenly spaced reference rows (0: all)
    background: bool = False  # neighbours: the rest's weight to one mean teacher (logit space)


@dataclass(frozen=True)
class MarketOutput:
    """Everything the market computed for one round."""

    accuracy: np.ndarray  # [K] reference-set accuracy in [0, 1]
    divergence: np.ndarray  # [K, K] mean pairwise divergence, zero diagonal
    similarity: np.ndarray  # [K, K] in (0, 1], ones on the diagonal
    weights: np.ndarray  # [K, K] teacher weights, rows sum to 1
    targets: np.ndarray  # [K, N, C] float32 soft targets, rows sum to 1 (N: the target rows)
    tau: np.ndarray  # [K] similarity temperature used for each client
    distill: np.ndarray  # [K] bool: the client gets targets (False: the gate kept them back)
    priors: np.ndarray  # [K, C] each client's class prior (mean predicted distribution)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis of ``logits / temperature`` (float64, same shape)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    expd = np.exp(scaled)
    return expd / expd.sum(axis=-1, keepdims=True)


def reference_accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy of each client on the reference set.

    Args:
        logits: ``[K, N, C]`` client logits.
        labels: ``[N]`` integer reference labels.

    Returns:
        ``[K]`` accuracies in [0, 1].
    """
    return _correct(logits, labels).mean(axis=1)


def _correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[K, N]`` bool: whether each client's top class is the label, client chunks on
    every core."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    out = np.empty(logits.shape[:2], dtype=bool)

    def chunk(part: slice) -> None:
        np.equal(logits[part].argmax(axis=-1), labels[None, :], out=out[part])

    for_each_chunk(len(logits), _CLIENT_CHUNK, chunk)
    return out


def similarity_graph(divergence: np.ndarray, tau: float) -> np.ndarray:
    """``S = exp(-D / tau)``: ``[K, K]`` similarities in (0, 1], ones on the diagonal."""
    if tau <= 0:
        raise ValueError(f"similarity temperature tau must be > 0, got {tau}")
    return np.exp(-np.asarray(divergence, dtype=np.float64) / tau)


def teacher_weights(
    similarity: np.ndarray,
    accuracy: np.ndarray,
    *,
    accuracy_exponent: float = 1.0,
    neighbours: int = 0,
    self_weight: float = -1.0,
    shares: np.ndarray | None = None,
    keep: np.ndarray | None = None,
    columns: np.ndarray | None = None,
) -> np.ndarray:
    """Per-client teacher mix ``W[k, j] ∝ S[k, j] * acc[j] ** gamma * share[j]``.

    Args:
        similarity: ``[K, K]`` similarity graph.
        accuracy: ``[K]`` reference accuracies in [0, 1], or ``[K, K]`` qualities
            ``Q[k, j]`` of each teacher j for each student k (:func:`label_quality`).
        accuracy_exponent: ``gamma``; 0 ignores accuracy.
        neighbours: keep only the ``m`` most similar other clients (0 keeps all).
        self_weight: fixed weight ``rho`` in [0, 1] on the client itself, or -1 to let
            the client compete by similarity and accuracy like any other teacher.
        shares: ``[K]`` weight share of each teacher (:func:`sybil_shares`; None: all 1).
        keep: ``[K, K]`` bool, the other teachers allowed (:func:`neighbour_mask`; None:
            computed from ``similarity`` and ``neighbours``).
        columns: ``[K, J]``, the client that each column of ``similarity`` and ``keep``
            stands for in each row (every row holds its own index once); then both are
            ``[K, J]``, ``keep`` is required and the weights come in the same layout (the
            client's teachers only, see :func:`candidate_weights`). None: ``[K, K]``.

    Returns:
        ``[K, K]`` (or ``[K, J]``) non-negative weights, each row summing to 1.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    num_clients = sim.shape[0]
    quality = _teacher_quality(accuracy, accuracy_exponent, shares)
    if columns is None:
        columns = np.arange(num_clients)[None, :]
        others = neighbour_mask(sim, neighbours) if keep is None else keep
    elif keep is None:
        raise ValueError("teacher_weights: columns needs keep")
    else:
        others = keep
    scores = sim * _pick(quality, columns)
    own = columns == np.arange(num_clients)[:, None]
    if self_weight < 0:
        scores = np.where(others | own, scores, 0.0)
        return scores / scores.sum(axis=1, keepdims=True)
    weights = np.where(others, scores, 0.0)
    row = weights.sum(axis=1, keepdims=True)
    lonely = row[:, 0] <= 0  # a single client, or every other teacher masked out
    # (a row summing to 0 holds only zeros: it stays as it is)
    np.divide(weights, row, out=weights, where=~lonely[:, None])
    weights *= 1.0 - self_weight
    weights += own * np.where(lonely, 1.0, self_weight)[:, None]
    return weights


def _teacher_quality(accuracy: np.ndarray, accuracy_exponent: float,
                     shares: np.ndarray | None) -> np.ndarray:
    """``[K]`` (or ``[K, K]``, per student) each teacher's factor ``acc ** gamma * share``
    in :func:`teacher_weights`."""
    # A tiny floor keeps a zero-accuracy client from zeroing a whole row. Qualities per
    # student ([K, K]) are floored on the diagonal only: a teacher worth nothing to a
    # student stays at 0 (a row of such teachers leaves the student to itself).
    quality = np.array(accuracy, dtype=np.float64)
    own = quality if quality.ndim == 1 else np.einsum("kk->k", quality)  # a view
    np.maximum(own, 1e-3, out=own)
    quality **= accuracy_exponent
    return quality if shares is None else quality * shares


def _pick(quality: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The qualities of the teachers ``columns`` (``[1, K]`` or ``[K, J]`` client indices)
    stand for, in their layout: ``quality[columns]`` of ``[K]`` qualities, each row's own
    entries of ``[K, K]`` ones."""
    if quality.ndim == 1:
        return quality[columns]
    return np.take_along_axis(quality, np.broadcast_to(columns, (len(quality), columns.shape[1])), axis=1)


def _own(quality: np.ndarray) -> np.ndarray:
    """``[K]``: each client's quality as its own teacher."""
    return quality if quality.ndim == 1 else np.diagonal(quality)


def label_quality(logits: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray) -> np.ndarray:
    """Each teacher's quality for each student: the geometric mean probability its own
    prediction (T = 1) gives the labels, each row weighted for the student.

    Args:
        logits: ``[K, M, C]`` the teachers' logits on the M scoring rows; labels: ``[M]``.
        sample_weights: ``[K, M]`` weight of each row for each student (its predicted
            class marginal at the row's label).

    Returns:
        ``[K, K]`` values ``Q[k, j] = exp(sum_i w[k, i] log p_j(y_i) / sum_i w[k, i])`` in
        (0, 1] (probabilities floored at 1e-12).
    """
    return np.exp(_mean_log_score(logits, labels, sample_weights))


def _mean_log_score(logits: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray) -> np.ndarray:
    """``[K, K]``: ``sum_i w[k, i] log p_j(y_i) / sum_i w[k, i]``, each teacher j's log
    probability (T = 1, floored at 1e-12) of the labels ``[M]`` from its logits
    ``[K, M, C]``, averaged with each student k's row weights ``[K, M]``."""
    log_right = np.log(np.maximum(own_label_probability(logits, labels), _EPS))  # [K, M]
    weights = np.asarray(sample_weights, np.float64)
    return weights @ log_right.T / np.maximum(weights.sum(axis=1, keepdims=True), _EPS)


def label_information(logits: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray,
                      priors: np.ndarray | None = None) -> np.ndarray:
    """What each teacher tells each student about the labels beyond a uniform guess: the
    log score of its prediction with its own class prior taken out, above ``log(1 / C)``.

    Args:
        logits: ``[K, M, C]`` the teachers' logits on the M scoring rows; labels: ``[M]``.
        sample_weights: ``[K, M]`` weight of each row for each student (its predicted
            class marginal at the row's label).
        priors: ``[K, C]`` the teachers' class priors, divided out of their predictions
            as the prior correction does before mixing (None: predictions as they are).

    Returns:
        ``[K, K]`` values ``I[k, j] = max(0, sum_i w[k, i] log p~_j(y_i) / sum_i w[k, i]
        + log C)`` in nats, ``p~_j = softmax(z_j - log pi_j)`` (T = 1). A teacher no
        better than a uniform guess on the student's classes gets 0, however often its
        top class is right: an inverted or rolled prediction scores below it.
    """
    logits = _prior_free(logits, priors)
    return np.maximum(_mean_log_score(logits, labels, sample_weights) + math.log(logits.shape[-1]), 0.0)


def _prior_free(logits: np.ndarray, priors: np.ndarray | None) -> np.ndarray:
    """``[K, M, C]`` logits with each client's log class prior (``[K, C]``) taken out, in
    the logits' dtype; None: the logits as they are."""
    logits = np.asarray(logits)
    if priors is None:
        return logits
    return logits - np.log(np.asarray(priors, np.float64))[:, None, :].astype(logits.dtype)


def class_information(logits: np.ndarray, labels: np.ndarray,
                      priors: np.ndarray | None = None) -> np.ndarray:
    """What each client's prediction tells about the labels of each class, beyond a
    uniform guess.

    Args:
        logits: ``[K, M, C]`` the clients' logits on the M scoring rows; labels: ``[M]``.
        priors: ``[K, C]`` class priors divided out first, as in :func:`label_information`.

    Returns:
        ``[K, C]`` values ``I_c[j] = max(0, mean_{i: y_i = c} log p~_j(y_i) + log C)`` in
        nats (0 for a class without scored rows), :func:`label_information` on the rows of
        one class. A teacher wrong on one class (a label-flip attacker on the classes it
        holds) gets 0 there however well it scores elsewhere, and a label-skewed honest
        teacher keeps the classes it knows.
    """
    logits = _prior_free(logits, priors)
    num_classes = logits.shape[-1]
    scores = np.log(np.maximum(own_label_probability(logits, labels), _EPS)) + math.log(num_classes)
    one_hot = np.eye(num_classes)[np.asarray(labels)]  # [M, C]
    return np.maximum(scores @ one_hot / np.maximum(one_hot.sum(axis=0), 1.0), 0.0)


def class_weights(weights: np.ndarray, quality: np.ndarray, per_class: np.ndarray,
                  exponent: float = 1.0) -> np.ndarray:
    """Each student's teacher weights for the rows of each class: a teacher's quality
    ``quality[k, j]`` in ``weights`` swapped for its information on the class.

    Args:
        weights: ``[K, J]`` teacher weights, rows sum to 1 (J = K, or K + 1 with the
            background teacher, whose weight keeps its share).
        quality: ``[K, K]`` the qualities they were computed with (:func:`label_information`).
        per_class: ``[K, C]`` :func:`class_information`.
        exponent: gamma, the power the qualities carry in the weights.

    Returns:
        ``[C, K, J]`` weights ``W_c[k, j] ∝ W[k, j] (I_c[j] / I[k, j]) ** gamma``, rows sum to 1;
        a student with no informative teacher on class c (itself included, when it is
        one) gets weight 1 on itself there: its targets are its own predictions. Own
        qualities are floored at 1e-3 as in :func:`teacher_weights`.
    """
    num_clients = quality.shape[0]
    own = np.eye(num_clients, dtype=bool)
    floor = np.where(own, 1e-3, 0.0)  # [K, K]
    base = np.maximum(quality, floor)
    swapped = np.maximum(per_class.T[:, None, :], floor[None])  # [C, K(k), K(j)]
    ratio = np.divide(swapped, base[None], out=np.zeros_like(swapped), where=base[None] > 0) ** exponent
    ratio = np.concatenate([ratio, np.ones(ratio.shape[:2] + (weights.shape[1] - num_clients,))], axis=2)
    out = weights[None] * ratio
    totals = out.sum(axis=2, keepdims=True)
    alone = np.zeros_like(weights)
    alone[:, :num_clients] = own  # the student's own predictions: nothing to learn there
    return np.where(totals > 0, out / np.where(totals > 0, totals, 1.0), alone[None])


def with_labels(targets: np.ndarray, labels: np.ndarray, share: float) -> np.ndarray:
    """Targets that give each row's label at least ``share`` of their mass: the teachers'
    mix scaled by ``1 - share``, plus ``share`` on the label.

    Distilling toward them is distilling toward the mix with weight ``1 - share`` plus
    cross-entropy on the labels with weight ``share`` (at the distillation temperature),
    so whatever the teachers say, a student keeps learning the labels of the public rows.

    Args:
        targets: ``[K, N, C]`` soft targets, rows sum to 1. labels: ``[N]`` in ``[0, C)``.
        share: in [0, 1).

    Returns:
        ``[K, N, C]`` in ``targets``' dtype, rows sum to 1; on every row the label's
        probability is at least ``share``, and any teacher moves any class's probability
        by at most ``1 - share`` of what it could move without the labels.
    """
    one_hot = np.eye(targets.shape[-1], dtype=targets.dtype)[np.asarray(labels)]  # [N, C]
    return ((1.0 - share) * targets + share * one_hot[None]).astype(targets.dtype)


def scoring_weights(priors: np.ndarray, labels: np.ndarray, uniform_share: float = 0.0) -> np.ndarray:
    """How much each scored row counts for each student: its predicted class marginal at
    the row's label, mixed with a uniform share.

    Args:
        priors: ``[K, C]`` the students' class marginals. labels: ``[M]`` the rows' labels.
        uniform_share: in [0, 1]; 0 judges teachers on the classes each student holds
            only, so a teacher's errors on the classes a student holds little of hardly
            count against it, though there the student learns from its targets alone.

    Returns:
        ``[K, M]`` weights ``(1 - u) pi_k(y_i) + u / C``.
    """
    # u = 0 gives the marginals exactly: 1.0 * w + 0.0 == w in floating point
    return (1.0 - uniform_share) * np.asarray(priors, np.float64)[:, labels] + uniform_share / priors.shape[1]


def neighbour_mask(closeness: np.ndarray, neighbours: int) -> np.ndarray:
    """``[K, K]`` bool: for each client, its ``neighbours`` closest other clients by
    ``closeness`` (higher is closer; ties to the lower index), or every other client when
    ``neighbours`` is 0 or at least K - 1. The diagonal is False."""
    num_clients = closeness.shape[0]
    others = ~np.eye(num_clients, dtype=bool)
    if 0 < neighbours < num_clients - 1:
        masked = np.where(others, closeness, -np.inf)
        # The m first of each row in a stable sort by decreasing closeness, without the
        # sort: the entries above the row's m-th largest value, then the entries equal
        # to it by increasing index until there are m.
        kth = -np.partition(-masked, neighbours - 1, axis=1)[:, neighbours - 1:neighbours]
        tied = masked == kth
        wanted = neighbours - (masked > kth).sum(axis=1, keepdims=True)
        others &= (masked > kth) | (tied & (np.cumsum(tied, axis=1) <= wanted))
    return others


def class_prior(logits: np.ndarray) -> np.ndarray:
    """Each client's class prior as its mean predicted distribution (at T = 1).

    Args:
        logits: ``[K, N, C]`` client logits.

    Returns:
        ``[K, C]`` distributions, floored at 1e-4 of a class and renormalised (a log is
        taken of them).
    """
    logits = np.asarray(logits)
    prior = np.empty((logits.shape[0], logits.shape[-1]))
    # Five passes over each chunk: small enough chunks stay in cache between them.
    per_chunk = _CACHED_CHUNK_BYTES // max(1, 4 * math.prod(logits.shape[1:]))

    def chunk(part: slice) -> None:
        expd = np.array(logits[part], dtype=np.float32)
        expd -= expd.max(axis=-1, keepdims=True)
        np.exp(expd, out=expd)  # [k, N, C]; the mean of its rows scaled to sum 1:
        share = (1.0 / row_sums(expd))[:, None, :] / logits.shape[1]  # [k, 1, N]
        prior[part] = np.matmul(share, expd)[:, 0]

    for_each_chunk(len(logits), per_chunk, chunk)
    prior = np.maximum(prior, 1e-4)
    return prior / prior.sum(axis=1, keepdims=True)


def reference_rows(logits: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """``logits[:, rows]`` of ``[K, N, C]`` logits, C-contiguous (``rows``: a slice or
    indices; numpy's fancy indexing would lay the rows out first, and every per-client
    step after it would stride across them)."""
    if isinstance(rows, slice):
        return logits[:, rows]
    return np.take(logits, rows, axis=1)


def own_label_probability(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[K, M]`` (float64): the probability each client's own softmax (T = 1) of its logits
    ``[K, M, C]`` gives the labels ``[M]``, clients in chunks on every core."""
    out = np.empty(logits.shape[:2])

    def chunk(part: slice) -> None:
        out[part] = label_softmax(logits[part], labels)

    for_each_chunk(len(logits), _CLIENT_CHUNK, chunk)
    return out


def probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The market's predictions at ``T``: :func:`softmax` of ``[K, N, C]`` logits in
    float32, client by client, floored at 1e-12 as every divergence floors them."""
    out = np.array(logits, dtype=np.float32)  # softmax in place, chunk by chunk
    for k in range(0, len(out), _CLIENT_CHUNK):
        chunk = out[k:k + _CLIENT_CHUNK]
        chunk /= temperature
        chunk -= chunk.max(axis=-1, keepdims=True)
        np.exp(chunk, out=chunk)
        chunk /= row_sums(chunk)[..., None]
        np.maximum(chunk, _EPS, out=chunk)
    return out


def centre(logits: np.ndarray) -> np.ndarray:
    """Logits minus their per-row mean over classes (the softmax is unchanged; a constant
    row of any size becomes zeros). Same shape; float32 stays float32 (the uploads are
    float32, and a round at K = 1,000 clients holds several such arrays), else float64."""
    z = np.asarray(logits)
    out = np.empty(z.shape, np.float32 if z.dtype == np.float32 else np.float64)

    def chunk(part: slice) -> None:
        mean = z[part].mean(axis=-1, keepdims=True, dtype=np.float64).astype(out.dtype)
        np.subtract(z[part], mean, out=out[part])

    for_each_chunk(len(z), _CLIENT_CHUNK, chunk)
    return out


def cap_loudness(logits: np.ndarray, factor: float) -> np.ndarray:
    """No teacher speaks louder than ``factor`` times the median teacher: on each row,
    each client's centred logit vector is scaled down to at most ``factor`` times the
    median (over clients) of that row's norms.

    Args:
        logits: ``[K, N, C]`` centred logits; factor: > 0 (0 or less: unchanged).

    Returns:
        ``[K, N, C]`` logits, each row scaled by a factor in (0, 1].
    """
    if factor <= 0:
        return logits
    norms = np.linalg.norm(logits, axis=-1)  # [K, N]
    cap = factor * np.median(norms, axis=0, keepdims=True)  # [1, N]
    scale = np.minimum(1.0, cap / np.maximum(norms, _EPS))
    return (logits * scale[..., None]).astype(logits.dtype, copy=False)


def consistent_accuracy(logits: np.ndarray, labels: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """Each client's accuracy judged on both kinds of rows: the lower of its accuracy on
    the held-out rows and on the distilled rows. A client cannot look better than its
    worse behaviour, so being right only where it is scored buys nothing.

    Args:
        logits: ``[K, N, C]``; labels: ``[N]``; held_out: ``[N]`` bool with rows of both kinds.

    Returns:
        ``[K]`` accuracies in [0, 1].
    """
    right = _correct(logits, labels)
    return np.minimum(right[:, held_out].mean(axis=1), right[:, ~held_out].mean(axis=1))


def sybil_shares(divergence: np.ndarray, threshold: float) -> np.ndarray:
    """``[K]`` weight share of each teacher: 1 / (size of its group), where a group joins
    clients whose predictions are closer than ``threshold`` (mean divergence; 0: no
    grouping), transitively. Identical uploads thus count once, however many send them."""
    num_clients = divergence.shape[0]
    if threshold <= 0:
        return np.ones(num_clients)
    group = np.arange(num_clients)
    close = np.asarray(divergence) < threshold
    for _ in range(num_clients):  # propagate the smallest index through each group
        merged = np.where(close, group[None, :], num_clients).min(axis=1)
        updated = np.minimum(group, merged)
        if np.array_equal(updated, group):
            break
        group = updated
    return 1.0 / np.bincount(group, minlength=num_clients)[group]


def run_market(  # pylint: disable=too-many-arguments
    logits: np.ndarray,
    labels: np.ndarray | None,
    params: MarketParams,
    held_out: np.ndarray | None = None,
    kernels: MarketKernels = FAST,
    target_rows: np.ndarray | None = None,
    unlabeled: np.ndarray | None = None,
    scored: np.ndarray | None = None,
) -> MarketOutput:
    """One market round: accuracy, similarity graph, teacher weights and targets.

    Args:
        logits: ``[K, N, C]`` finite logits of the K participating clients (float32
            stays float32).
        labels: ``[N]`` reference labels in ``[0, C)``, or None: the unlabeled mode
            (:mod:`kta_flwr.maths.label_free`): teachers are scored on their agreement
            with the others (:func:`_label_free_scores`), and the adaptive market picks
            tau and gates on the quality-weighted consensus; the defences that need
            labels (``consistency``, ``class_quality``, ``label_share``) do not apply.
        params: the market's knobs.
        held_out: ``[N]`` bool, the rows clients never distill on; the adaptive market
            scores its candidates there (None or no row set: on every row).
        kernels: the heavy computations (:data:`kta_flwr.maths.market_kernels.FAST`, or
            the direct transcription ``market_reference.REFERENCE``).
        target_rows: ``[N]`` bool, the rows to compute targets on (the strategy's: those
            not held out, the only ones it sends); None: every row. Nothing else depends
            on it.
        unlabeled: ``[K, T, C]`` the same clients' logits on T unlabeled transfer rows
            (None: none). Teachers are scored, and the graph measured, on the labeled
            rows alone; these rows only get targets, mixed by the same weights.
        scored: unlabeled mode: ``[K, N]`` bool, the rows each client is scored on as a
            teacher (its reserve, rows it is never sent targets on); None: the held-out
            rows (every row when none is held out).

    Returns:
        The round's :class:`MarketOutput`; its ``targets`` (``[K, N_t + T, C]``) cover
        ``target_rows``, then the unlabeled rows.
    """
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [K, N, C], got shape {logits.shape}")
    labeled = labels is not None
    if labeled and logits.shape[1] != len(labels):
        raise ValueError(f"logits cover {logits.shape[1]} samples, labels {len(labels)}")
    if not labeled and params.weighting == "learned":
        raise ValueError("the learned (KT-pFL) weights are fitted to the reference labels; "
                         "the unlabeled mode has none")
    if params.background and params.target_space != "logit":
        raise ValueError("the background teacher needs target_space='logit' (a mean of logits "
                         f"mixes linearly only there), got {params.target_space!r}")
    # Teachers are judged on everything they said (centred: a constant row says
    # nothing) and mixed with their loudness capped: a teacher that shouts wrong answers
    # is scored as shouting, and pulls no harder than ``loudness_cap`` x the median.
    logits = centre(logits)
    mixed = cap_loudness(logits, params.loudness_cap)
    num_rows = logits.shape[1]
    divergence = kernels.divergence(
        probabilities(reference_rows(logits, _divergence_rows(num_rows, params)), params.temperature),
        params.divergence,
    )
    shares = sybil_shares(divergence, params.sybil_divergence)
    estimated_priors = class_prior(logits)
    priors = estimated_priors if params.prior_correction else None
    both = held_out is not None and 0 < np.count_nonzero(held_out) < num_rows
    if not labeled:  # the others' consensus stands in for the labels
        if scored is None:
            scored = np.broadcast_to(np.asarray(held_out, bool) if both else True, logits.shape[:2])
        accuracy, agreement, labels = _label_free_scores(logits, estimated_priors, priors, shares,
                                                         scored, params)
    elif params.consistency and both:
        accuracy = consistent_accuracy(logits, labels, np.asarray(held_out, bool))
    else:
        accuracy = reference_accuracy(logits, labels)
    labels = np.asarray(labels)
    similarity = similarity_graph(divergence, params.tau)
    num_clients = logits.shape[0]
    taus = np.full(num_clients, params.tau)
    distill = np.ones(num_clients, dtype=bool)
    if params.weighting == "uniform":
        weights = np.full((num_clients, num_clients), 1.0 / num_clients)
        taus[:] = np.inf
    elif params.weighting == "learned":
        weights = learned_weights(logits, labels, probabilities(logits, params.temperature), params)
        taus[:] = np.nan
    elif params.weighting != "market":
        raise ValueError(
            f"unknown weighting {params.weighting!r}; use market, uniform or learned"
        )
    else:
        rows = np.arange(len(labels))  # the scoring rows
        if held_out is not None and np.any(held_out):
            rows = np.flatnonzero(held_out)
        scoring = reference_rows(logits, rows)
        sample_weights = scoring_weights(estimated_priors, labels[rows], params.score_uniform_share)
        quality = accuracy
        if not labeled:
            quality = agreement if params.teacher_quality == "information" else accuracy
        elif params.teacher_quality == "information":
            quality = label_information(scoring, labels[rows], sample_weights, priors)
        elif params.teacher_quality == "likelihood":
            quality = label_quality(scoring, labels[rows], sample_weights)
        elif params.teacher_quality != "accuracy":
            raise ValueError(f"unknown teacher_quality {params.teacher_quality!r}; "
                             "use information, likelihood or accuracy")
        if params.adaptive:
            taus, weights, distill = adaptive_weights(
                scoring, labels[rows], divergence, quality, params,
                sample_weights=sample_weights, priors=priors, shares=shares, kernels=kernels,
            )
            similarity = np.exp(-divergence / taus[:, None])
        else:
            weights = _weights_at(similarity, quality, params, shares)
            if _uses_background(params, num_clients):
                weights = with_background(weights[None], divergence, quality, params, shares,
                                          np.array([params.tau]))[0]
    target_labels = labels
    if target_rows is not None:
        mixed = reference_rows(mixed, np.flatnonzero(target_rows))
        target_labels = labels[np.asarray(target_rows, bool)]
    teachers, teacher_priors = _teachers(mixed, priors, weights)
    per_class = None
    if (labeled and params.class_quality and params.weighting == "market"
            and params.teacher_quality == "information"):
        per_class = class_weights(weights, quality,
                                  class_information(scoring, labels[rows], priors),
                                  params.accuracy_exponent)
    targets = _class_targets(teachers, weights, per_class, target_labels, params, teacher_priors, kernels)
    if labeled and params.label_share > 0:
        targets = with_labels(targets, target_labels, params.label_share)
    if unlabeled is not None and np.asarray(unlabeled).shape[1] > 0:
        transfer_teachers, _ = _teachers(cap_loudness(centre(unlabeled), params.loudness_cap), priors, weights)
        targets = np.concatenate(
            [targets, _class_targets(transfer_teachers, weights, None, np.arange(0), params,
                                     teacher_priors, kernels)], axis=1)
    return MarketOutput(accuracy, divergence, similarity, dense_weights(weights), targets, taus,
                        distill, estimated_priors)


def _label_free_scores(  # pylint: disable=too-many-arguments
    logits: np.ndarray, estimated_priors: np.ndarray, priors: np.ndarray | None, shares: np.ndarray,
    scored: np.ndarray, params: MarketParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unlabeled mode's scores (:mod:`kta_flwr.maths.label_free`) of the centred
    ``logits`` ``[K, N, C]``.

    Each client's pseudo-labels are the others' consensus (priors out, loudness capped,
    Sybil shares); it is scored on its ``scored`` rows (``[K, N]`` bool) as it uploaded
    them (priors out), each row weighted for the student by its class marginal
    (``estimated_priors``) at the consensus label.

    Returns:
        (``[K]`` agreement rate with its pseudo-labels, ``[K, K]`` information about them
        ``I[k, j]``, ``[N]`` the labels the adaptive market scores on: the consensus with
        each client weighted by its mean information times its share).
    """
    prior_free = _prior_free(logits, priors)
    capped = cap_loudness(prior_free, params.loudness_cap)
    pseudo = leave_one_out_labels(capped, shares)
    row_weights = scoring_weights(estimated_priors, consensus_labels(capped, shares), params.score_uniform_share)
    information = agreement_information(prior_free, pseudo, row_weights, scored)
    value = information.mean(axis=0) * shares
    labels = consensus_labels(capped, value if value.sum() > 0 else shares)
    return agreement_rate(prior_free, pseudo, scored), information, labels


def global_consensus(  # pylint: disable=too-many-arguments
    logits: np.ndarray,
    labels: np.ndarray,
    params: MarketParams,
    divergence: np.ndarray | None = None,
    priors: np.ndarray | None = None,
    unlabeled: np.ndarray | None = None,
) -> np.ndarray:
    """The market's consensus on the public rows, for one student with no class prior of
    its own (the server's global model): each row of class c mixes the clients' logits
    by what each tells about class c, with the market's defences.

    Every client is centred and its loudness capped (``params.loudness_cap``), its class
    prior divided out (``params.prior_correction``: a label-skewed client's lean toward
    its own classes is not knowledge of the inputs), and weighted on the rows of class c
    by ``I_c[j] ** gamma * s_j``: its :func:`class_information` on the rows of class c
    given here (all of them: a client wrong on some rows of a class loses its weight on
    every row of that class) times its Sybil share ``s_j`` (:func:`sybil_shares` of
    ``divergence``). A class no client informs on keeps its label: a one-hot row. On
    unlabeled transfer rows a row's class is unknown, so each client weighs
    ``mean_c I_c[j] ** gamma * s_j``, its information averaged over the classes, in the
    same mix; a row no client informs on is uniform.

    Args:
        logits: ``[K, N, C]`` the clients' uploaded logits on N public rows.
        labels: ``[N]`` those rows' labels (the reference set is labeled and public).
        params: the market's knobs (``loudness_cap``, ``prior_correction``,
            ``accuracy_exponent``, ``sybil_divergence``, ``temperature``).
        divergence: ``[K, K]`` the round's divergences (for the Sybil shares; None: no
            grouping).
        priors: ``[K, C]`` the clients' class priors (:class:`MarketOutput`'s of the same
            logits; None: estimated here, :func:`class_prior`).
        unlabeled: ``[K, T, C]`` the same clients' logits on T unlabeled transfer rows
            (None: none); the weights are still scored on the labeled rows only.

    Returns:
        ``[N + T, C]`` float32 probabilities at temperature ``params.temperature``, rows
        sum to 1: the labeled rows, then the unlabeled ones (as :func:`run_market`'s targets).
    """
    logits = centre(np.asarray(logits))
    labels = np.asarray(labels)
    per_class, priors = _consensus_weights(logits, labels, params, divergence, priors)
    out, informed = _consensus_mix(logits, per_class[:, labels], priors, params)  # weights [K, N]
    out[~informed] = np.eye(logits.shape[-1])[labels[~informed]]
    if unlabeled is None:
        return out
    unlabeled = centre(np.asarray(unlabeled))
    row_weights = np.repeat(per_class.mean(axis=1, keepdims=True), unlabeled.shape[1], axis=1)  # [K, T]
    return np.concatenate([out, _consensus_mix(unlabeled, row_weights, priors, params)[0]])


def _consensus_weights(
    logits: np.ndarray, labels: np.ndarray, params: MarketParams, divergence: np.ndarray | None,
    priors: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(``[K, C]`` each client's weight on the rows of each class, ``I_c[j] ** gamma *
    s_j``; the priors divided out, None without ``prior_correction``) from centred
    ``logits`` ``[K, N, C]`` on rows labelled ``labels``."""
    if not params.prior_correction:
        priors = None
    elif priors is None:
        priors = class_prior(logits)
    informed = class_information(logits, labels, priors)  # [K, C], scored on every row
    shares = (np.ones(logits.shape[0]) if divergence is None
              else sybil_shares(divergence, params.sybil_divergence))
    return informed ** params.accuracy_exponent * shares[:, None], priors


def _consensus_mix(logits: np.ndarray, row_weights: np.ndarray, priors: np.ndarray | None,
                   params: MarketParams) -> tuple[np.ndarray, np.ndarray]:
    """(``[N, C]`` float32 probabilities of the centred ``logits`` ``[K, N, C]``, loudness
    capped and prior-free, mixed in logit space by ``row_weights`` ``[K, N]``; ``[N]``
    bool: rows some client has weight on — the others are uniform)."""
    totals = row_weights.sum(axis=0)  # [N]
    mixed = np.einsum("kn,knc->nc", row_weights / np.where(totals > 0, totals, 1.0),
                      _prior_free(cap_loudness(logits, params.loudness_cap), priors).astype(np.float64))
    return softmax(mixed, params.temperature).astype(np.float32), totals > 0


def _class_targets(  # pylint: disable=too-many-arguments
    teachers: np.ndarray, weights: np.ndarray, per_class: np.ndarray | None, labels: np.ndarray,
    params: MarketParams, priors: np.ndarray | None, kernels: MarketKernels,
) -> np.ndarray:
    """``[K, N, C]`` targets of the teachers ``[J, N, C]`` on rows labelled ``labels``
    ``[N]``: mixed by ``weights`` ``[K, J]``, or the rows of each class c by
    ``per_class[c]`` (``[C, K, J]``, None: one mix)."""
    def mix(rows: np.ndarray | slice, row_weights: np.ndarray) -> np.ndarray:
        return kernels.targets(reference_rows(teachers, rows), row_weights, temperature=params.temperature,
                               space=params.target_space, priors=priors)

    if per_class is None:
        return mix(slice(None), weights)
    out = np.empty((weights.shape[0],) + teachers.shape[1:], np.float32)
    for label, class_weight in enumerate(per_class):
        rows = np.flatnonzero(labels == label)
        if len(rows):
            out[:, rows] = mix(rows, class_weight)
    return out


def _uses_background(params: MarketParams, num_clients: int) -> bool:
    """Whether the background teacher applies: asked for, and the m nearest leave some out."""
    return params.background and params.weighting == "market" and 0 < params.neighbours < num_clients - 1


def background_logits(logits: np.ndarray, priors: np.ndarray | None) -> np.ndarray:
    """``[N, C]`` (``logits``' dtype): the background teacher, the mean over the K clients of
    their logits ``[K, N, C]``, each shifted by its log class prior (``priors`` ``[K, C]``;
    None: as they are). Its own prior is 1 (shift 0)."""
    shifted = np.asarray(logits).mean(axis=0, dtype=np.float64)  # no float64 copy of [K, N, C]
    if priors is not None:
        shifted -= np.log(np.asarray(priors, np.float64)).mean(axis=0)[None, :]
    return shifted.astype(logits.dtype)


def _teachers(logits: np.ndarray, priors: np.ndarray | None,
              weights: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The teachers that ``weights`` (``[..., K, J]``) mix: the K clients' logits and
    priors, with the background teacher appended when J = K + 1."""
    if weights.shape[-1] == logits.shape[0]:
        return logits, priors
    extra = background_logits(logits, priors)[None]
    teachers = np.concatenate([logits, extra])
    if priors is None:
        return teachers, None
    return teachers, np.concatenate([priors, np.ones((1, priors.shape[1]), priors.dtype)])


def dense_weights(weights: np.ndarray) -> np.ndarray:
    """``[K, K]`` client-to-client weights of ``[K, K]`` or ``[K, K + 1]`` ones (the last
    column the background teacher, spread evenly over the K clients: the same targets in
    ``logit`` space)."""
    num_clients = weights.shape[0]
    if weights.shape[1] == num_clients:
        return weights
    return weights[:, :num_clients] + weights[:, num_clients:] / num_clients


def with_background(  # pylint: disable=too-many-arguments
    candidates: np.ndarray, divergence: np.ndarray, accuracy: np.ndarray,
    params: MarketParams, shares: np.ndarray | None, taus: np.ndarray,
) -> np.ndarray:
    """Candidate weights ``[G, K, K]`` on each client's m nearest teachers (at the taus
    ``[G]``) as ``[G, K, K + 1]``: the full weights over every client (``neighbours`` = 0)
    on those teachers, and the rest of each row on the background teacher (last column).

    The m nearest keep their relative weights, so each row is scaled by ``f_k``, the
    share the m nearest (and, when it competes, the client itself) hold of the full
    row's mass ``sum_j S[k, j] acc[j] ** gamma share[j]``; the background gets the rest.
    """
    num_clients = len(divergence)
    quality = _teacher_quality(accuracy, params.accuracy_exponent, shares)
    own = np.eye(num_clients, dtype=bool)
    kept = neighbour_mask(-divergence, params.neighbours)  # the m nearest others
    columns = first_true_columns(kept, params.neighbours)  # [K, m]
    near_divergence = np.take_along_axis(divergence, columns, axis=1)
    near_quality = _pick(quality, columns)
    competes = params.self_weight < 0
    out = np.empty((len(taus), num_clients, num_clients + 1))
    for candidate, weights, tau in zip(out, candidates, taus):
        sim = similarity_graph(divergence, tau)
        np.fill_diagonal(sim, 0.0)
        # [K] the full row's mass over the other clients
        others = sim @ quality if quality.ndim == 1 else (sim * quality).sum(axis=1)
        near = (similarity_graph(near_divergence, tau) * near_quality).sum(axis=1)
        rest = np.maximum(others - near, 0.0)  # beyond the m nearest
        total = others + (_own(quality) if competes else 0.0)  # the client's own S[k, k] = 1
        # (every other similarity underflowed: no mass anywhere, the row stays as it is)
        total = np.where(total > 0, total, 1.0)
        share = 1.0 - rest / total  # what the kept columns hold, in (0, 1]
        scale = share[:, None] if competes else np.where(own, 1.0, share[:, None])
        np.multiply(weights, scale, out=candidate[:, :num_clients])
        candidate[:, num_clients] = (1.0 if competes else 1.0 - params.self_weight) * rest / total
    return out


def _divergence_rows(num_rows: int, params: MarketParams) -> slice | np.ndarray:
    """The rows the divergences are measured on: all, or ``divergence_rows`` evenly
    spaced ones (the same rows every round)."""
    if not 0 < params.divergence_rows < num_rows:
        return slice(None)
    return np.unique(np.linspace(0, num_rows - 1, params.divergence_rows).round().astype(int))


def _weights_at(  # pylint: disable=too-many-arguments
    similarity: np.ndarray, accuracy: np.ndarray, params: MarketParams,
    shares: np.ndarray | None = None, keep: np.ndarray | None = None,
    columns: np.ndarray | None = None,
) -> np.ndarray:
    return teacher_weights(
        similarity,
        accuracy,
        accuracy_exponent=params.accuracy_exponent,
        neighbours=params.neighbours,
        self_weight=params.self_weight,
        shares=shares,
        keep=keep,
        columns=columns,
    )


def candidate_weights(
    divergence: np.ndarray, accuracy: np.ndarray, params: MarketParams,
    shares: np.ndarray | None = None,
) -> np.ndarray:
    """Teacher weights at every tau of ``params.tau_grid``.

    Args:
        divergence: ``[K, K]``; accuracy: ``[K]``; shares: ``[K]`` (:func:`sybil_shares`).

    Returns:
        ``[G, K, K]``, ``G = len(params.tau_grid)``: :func:`teacher_weights` of
        ``similarity_graph(divergence, tau)``. The m nearest teachers (``neighbours``) are
        the same at every tau (S is monotone in D); when they are few, each client's
        weights are computed on its own m + 1 columns only (``K·m`` work per tau, not K²).
    """
    grid = np.asarray(params.tau_grid, dtype=np.float64)
    num_clients = len(divergence)
    keep = neighbour_mask(-divergence, params.neighbours)
    allowed = keep | np.eye(num_clients, dtype=bool)
    width = int(allowed.sum(axis=1).max())
    if not few_teachers(width, num_clients):  # the dense matrices
        return np.stack([_weights_at(similarity_graph(divergence, tau), accuracy, params, shares, keep)
                         for tau in grid])
    columns = first_true_columns(allowed, width)  # [K, m + 1], own included
    rows = np.arange(num_clients)[:, None]
    near, kept = divergence[rows, columns], keep[rows, columns]
    out = np.zeros((len(grid), num_clients, num_clients))
    for candidate, tau in zip(out, grid):
        candidate[rows, columns] = _weights_at(similarity_graph(near, tau), accuracy, params,
                                               shares, kept, columns)
    return out


def label_likelihood(
    targets: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray
) -> np.ndarray:
    """Weighted mean log-likelihood of the reference labels under each client's targets.

    Args:
        targets: ``[K, N, C]`` soft targets.
        labels: ``[N]`` reference labels.
        sample_weights: ``[K, N]`` non-negative weight of each sample for each client.

    Returns:
        ``[K]`` values ``sum_i w[k, i] log q[k, i, y_i] / sum_i w[k, i]`` (<= 0).
    """
    picked = np.take_along_axis(targets, np.asarray(labels)[None, :, None], axis=-1)[..., 0]
    return weighted_log_likelihood(picked, sample_weights)


def weighted_log_likelihood(picked: np.ndarray, sample_weights: np.ndarray) -> np.ndarray:
    """``[..., K]`` values ``sum_i w[k, i] log p[..., k, i] / sum_i w[k, i]`` of the
    probabilities ``picked`` (``[..., K, M]``) given to the true labels."""
    logq = np.log(np.clip(np.asarray(picked, np.float64), _EPS, 1.0))
    return (sample_weights * logq).sum(axis=-1) / np.maximum(sample_weights.sum(axis=-1), _EPS)


def adaptive_weights(  # pylint: disable=too-many-arguments
    logits: np.ndarray,
    labels: np.ndarray,
    divergence: np.ndarray,
    accuracy: np.ndarray,
    params: MarketParams,
    *,
    sample_weights: np.ndarray,
    priors: np.ndarray | None = None,
    shares: np.ndarray | None = None,
    kernels: MarketKernels = FAST,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-client sharpness: the ``tau`` in ``params.tau_grid`` whose targets maximise
    :func:`label_likelihood` on the scoring rows; with ``params.gate``, whether that mix
    beats the client's own predictions there.

    Args:
        logits: ``[K, M, C]`` logits on the M scoring (held-out) rows; labels: ``[M]``.
        divergence: ``[K, K]`` from all rows; accuracy: ``[K]`` teacher accuracies or
            ``[K, K]`` qualities per student (:func:`teacher_weights`).
        sample_weights: ``[K, M]`` weight of each scoring row for each client (its
            predicted class marginal at the row's label).
        priors: ``[K, C]`` class priors for the prior correction (None: none).
        shares: ``[K]`` teacher weight shares (:func:`sybil_shares`; None: all 1).
        kernels: computes each candidate's probability of the labels.

    Returns:
        ``([K] chosen tau, [K, K] teacher weights at each client's tau (``[K, K + 1]``
        with the background teacher, :func:`with_background`), [K] bool: the client gets
        targets)``.
    """
    grid = np.asarray(params.tau_grid, dtype=np.float64)
    candidates = candidate_weights(divergence, accuracy, params, shares)  # [G, K, K]
    if _uses_background(params, len(divergence)):  # [G, K, K + 1]
        candidates = with_background(candidates, divergence, accuracy, params, shares, grid)
    teachers, teacher_priors = _teachers(logits, priors, candidates)
    # Scored at T = 1: the mix is judged as a predictor, not at the (flatter)
    # distillation temperature, which would favour single over-confident teachers.
    picked = kernels.label_probability(teachers, labels, candidates, space=params.target_space,
                                       priors=teacher_priors)
    scores = weighted_log_likelihood(picked, sample_weights[None])  # [G, K]
    # Among near-ties (within ``tie_tolerance`` nats of the best) take the broadest tau:
    # a sharper, more personal mix must earn its place with clearly better evidence.
    good = scores >= scores.max(axis=0, keepdims=True) - params.tie_tolerance
    best = len(grid) - 1 - np.argmax(good[::-1], axis=0)
    rows = np.arange(logits.shape[0])
    distill = np.ones(logits.shape[0], dtype=bool)
    if params.gate:
        own = weighted_log_likelihood(own_label_probability(logits, labels), sample_weights)
        distill = scores[best, rows] > own
    return grid[best], candidates[best, rows], distill


def learned_weights(
    logits: np.ndarray, labels: np.ndarray, probs: np.ndarray, params: MarketParams
) -> np.ndarray:
    """KT-pFL-style coefficients learned on the server (see the module docstring).

    Args:
        logits: ``[K, N, C]``; labels: ``[N]``; probs: ``[K, N, C]`` softened at ``T``
        (only their class marginal is used, as sample weights).

    Returns:
        ``[K, K]`` teacher weights, rows sum to 1; the client's own entry is
        ``params.self_weight`` when that is in [0, 1] (the rest is learned over the
        others), or learned like the others when it is -1.
    """
    num_clients = logits.shape[0]
    if num_clients == 1:
        return np.ones((1, 1))
    marginal = probs.mean(axis=1, dtype=np.float64)
    sample_weights = marginal[:, np.asarray(labels)]  # [K, N]
    sample_weights /= sample_weights.sum(axis=1, keepdims=True)
    # Probability each client's T=1 prediction gives the true label: [K, N]
    picked = np.take_along_axis(softmax(logits, 1.0), np.asarray(labels)[None, :, None], -1)[..., 0]
    learn_self = params.self_weight < 0
    weights = np.zeros((num_clients, num_clients))
    for k in range(num_clients):
        teachers = np.arange(num_clients) if learn_self else np.delete(np.arange(num_clients), k)
        p_true = picked[teachers]  # [J, N]
        w = np.full(len(teachers), 1.0 / len(teachers))
        for _ in range(params.learn_steps):
            q_true = np.maximum(w @ p_true, _EPS)  # [N]
            responsibility = (w[:, None] * p_true / q_true) @ sample_weights[k]  # sums to 1
            w = (responsibility + params.learn_prior / len(teachers)) / (1.0 + params.learn_prior)
        if learn_self:
            weights[k, teachers] = w
        else:
            weights[k, teachers] = (1.0 - params.self_weight) * w
            weights[k, k] = params.self_weight
    return weights
