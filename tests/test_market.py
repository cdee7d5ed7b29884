"""Unit tests of the pure market, on cases that can be checked by hand."""

import numpy as np
import pytest

from kta_flwr.maths.market import (
    MarketParams,
    candidate_weights,
    class_prior,
    label_likelihood,
    pairwise_divergence,
    reference_accuracy,
    run_market,
    similarity_graph,
    softmax,
    soft_targets,
    teacher_weights,
)
from kta_flwr.maths.market_kernels import DIVERGENCES

FIXED = MarketParams(adaptive=False, tau=0.1, self_weight=-1.0)


def skewed_logits(rng, labels, favoured, num_classes=4, strength=4.0, noise=0.5):
    """Logits of a client that predicts the true label, but is biased to ``favoured``."""
    logits = rng.normal(0, noise, (len(labels), num_classes))
    logits[np.arange(len(labels)), labels] += 2.0
    logits[:, favoured] += strength
    return logits


def test_reference_accuracy_by_hand():
    labels = np.array([0, 1, 2, 0])
    logits = np.zeros((2, 4, 3))
    logits[0, np.arange(4), labels] = 1.0  # all right
    logits[1, :, 1] = 1.0  # always predicts class 1: right once
    np.testing.assert_allclose(reference_accuracy(logits, labels), [1.0, 0.25])


def test_js_divergence_by_hand():
    probs = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]])
    div = pairwise_divergence(probs, "js")
    assert div[0, 1] == pytest.approx(np.log(2), rel=1e-6)  # disjoint supports: ln 2
    assert div[0, 2] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(div, div.T)
    np.testing.assert_allclose(np.diag(div), 0.0)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences_symmetric_non_negative(kind):
    probs = softmax(np.random.default_rng(0).normal(size=(5, 20, 4)))
    div = pairwise_divergence(probs, kind)
    assert (div >= 0).all() and np.allclose(div, div.T) and np.allclose(np.diag(div), 0)


def test_squared_hellinger_brackets_jensen_shannon():
    """ln 2 · H² <= JS <= H², term by term (both are sums of terms homogeneous in (p, q)):
    the Hellinger graph orders clients nearly as the Jensen-Shannon one."""
    rng = np.random.default_rng(5)
    probs = softmax(rng.normal(0, 3, (12, 40, 6)))
    js, hellinger = pairwise_divergence(probs, "js"), pairwise_divergence(probs, "hellinger")
    off = ~np.eye(12, dtype=bool)
    assert (js[off] <= hellinger[off] * (1 + 1e-9)).all()
    assert (js[off] >= np.log(2) * hellinger[off] * (1 - 1e-9)).all()
    disjoint = pairwise_divergence(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]), "hellinger")
    assert disjoint[0, 1] == pytest.approx(1.0, abs=1e-5)  # (floored at 1e-12)


def test_identical_clients_get_uniform_weights():
    logits = np.repeat(np.random.default_rng(1).normal(size=(1, 30, 5)), 4, axis=0)
    labels = np.random.default_rng(2).integers(0, 5, 30)
    for params in (FIXED, MarketParams(), MarketParams(self_weight=0.0, adaptive=False)):
        out = run_market(logits, labels, params)
        off_diag = out.weights[~np.eye(4, dtype=bool)]
        if params.self_weight == 0.0:
            np.testing.assert_allclose(off_diag, 1 / 3)
        else:
            np.testing.assert_allclose(out.weights, 0.25)


def test_random_client_gets_less_weight_than_accurate_ones():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 200)
    accurate = np.eye(4)[labels] * 3.0 + rng.normal(0, 0.3, (200, 4))
    logits = np.stack([accurate, accurate + rng.normal(0, 0.3, (200, 4)), rng.normal(0, 3.0, (200, 4))])
    out = run_market(logits, labels, MarketParams(adaptive=False, tau=10.0, self_weight=-1.0))
    assert out.accuracy[2] < 0.5 < out.accuracy[0]
    assert out.weights[0, 2] < out.weights[0, 1]
    assert out.weights[1, 2] < out.weights[1, 0]


def test_similar_label_skew_weighs_more():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 300)
    logits = np.stack(
        [skewed_logits(rng, labels, f) for f in ([0, 1], [0, 1], [2, 3], [2, 3])]
    )
    out = run_market(logits, labels, FIXED)
    assert out.weights[0, 1] > out.weights[0, 2] and out.weights[0, 1] > out.weights[0, 3]
    assert out.weights[2, 3] > out.weights[2, 0] and out.weights[2, 3] > out.weights[2, 1]


@pytest.mark.parametrize("space", ["prob", "logit"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_targets_are_distributions(space, adaptive):
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 5, (6, 40, 7))
    out = run_market(logits, rng.integers(0, 7, 40), MarketParams(target_space=space, adaptive=adaptive))
    assert out.targets.shape == (6, 40, 7) and out.targets.dtype == np.float32
    assert (out.targets >= 0).all()
    np.testing.assert_allclose(out.targets.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.weights.sum(1), 1.0)


def test_fedmd_is_uniform_mean_of_predictions():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(3, 10, 4))
    out = run_market(logits, rng.integers(0, 4, 10), MarketParams(weighting="uniform", target_space="prob", prior_correction=False))
    mean = softmax(logits).mean(axis=0)
    for k in range(3):
        np.testing.assert_allclose(out.targets[k], mean, atol=1e-6)


def test_fixed_self_weight_and_neighbours():
    sim = similarity_graph(np.array([[0, 0.1, 0.5, 0.9], [0.1, 0, 0.4, 0.8],
                                     [0.5, 0.4, 0, 0.2], [0.9, 0.8, 0.2, 0]]), tau=0.1)
    w = teacher_weights(sim, np.ones(4), self_weight=0.25, neighbours=1)
    np.testing.assert_allclose(np.diag(w), 0.25)
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert w[0, 1] == pytest.approx(0.75) and w[0, 2] == 0 and w[0, 3] == 0  # nearest only
    assert w[3, 2] == pytest.approx(0.75)


@pytest.mark.parametrize("self_weight", [-1.0, 0.0, 0.3])
@pytest.mark.parametrize("neighbours", [0, 3, 20])
def test_candidate_weights_on_the_teachers_columns_equal_the_dense_matrices(self_weight, neighbours):
    rng = np.random.default_rng(7)
    divergence = rng.uniform(0, 0.5, (40, 40))
    divergence = divergence + divergence.T
    np.fill_diagonal(divergence, 0.0)
    divergence[5, 9] = divergence[9, 5] = divergence[5, 8]  # a tie: the lower index wins
    accuracy, shares = rng.uniform(0, 1, 40), rng.choice([1.0, 0.5], 40)
    accuracy[3] = 0.0
    params = MarketParams(neighbours=neighbours, self_weight=self_weight)
    got = candidate_weights(divergence, accuracy, params, shares)
    want = np.stack([teacher_weights(similarity_graph(divergence, tau), accuracy, shares=shares,
                                     neighbours=neighbours, self_weight=self_weight)
                     for tau in params.tau_grid])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert ((got > 0).sum(axis=-1) <= (neighbours or 39) + 1).all()


def test_single_client_teaches_itself():
    w = teacher_weights(np.ones((1, 1)), np.array([0.5]), self_weight=0.0)
    np.testing.assert_allclose(w, [[1.0]])


def test_label_likelihood_by_hand():
    targets = np.array([[[0.5, 0.5], [0.25, 0.75]]])
    value = label_likelihood(targets, np.array([0, 1]), np.array([[1.0, 1.0]]))
    assert value[0] == pytest.approx((np.log(0.5) + np.log(0.75)) / 2)


def specialist_logits(rng, labels, known, num_classes=4, signal=4.0, noise=0.5):
    """Logits of a client trained only on the classes ``known``: right on those, and on
    any other class it names one of ``known`` at random (it never saw the others)."""
    logits = rng.normal(0, noise, (len(labels), num_classes))
    guess = np.where(np.isin(labels, known), labels, rng.choice(known, len(labels)))
    logits[np.arange(len(labels)), guess] += signal
    return logits


def test_adaptive_picks_sharp_mix_when_label_mixes_differ():
    """Two groups with disjoint classes: each client must learn from its own group."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, 400)
    groups = ([0, 1], [0, 1], [2, 3], [2, 3])
    logits = np.stack([specialist_logits(rng, labels, g) for g in groups])
    out = run_market(logits, labels, MarketParams(self_weight=0.0))
    assert out.tau.max() < 1.0  # sharp
    assert out.weights[0, 1] > 0.9 and out.weights[2, 3] > 0.9


def test_adaptive_picks_broad_mix_when_label_mixes_agree():
    """IID clients with independent noise: averaging everyone is best."""
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 4, 400)
    logits = np.stack([np.eye(4)[labels] * 1.0 + rng.normal(0, 1.0, (400, 4)) for _ in range(5)])
    params = MarketParams(self_weight=0.0)
    out = run_market(logits, labels, params)
    assert np.median(out.tau) >= 1.0  # broad for most clients
    off_diag = out.weights[~np.eye(5, dtype=bool)].reshape(5, 4)
    assert off_diag.min() > 0.15  # every other client contributes


def test_gate_keeps_targets_from_a_client_no_teacher_can_help():
    """Client 0 knows the labels; the others guess. Its own predictions beat every mix,
    so it gets no targets; the guessers, whom client 0 can teach, get theirs."""
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 4, 300)
    expert = specialist_logits(rng, labels, [0, 1, 2, 3])
    guessers = [rng.normal(0, 1.0, (300, 4)) for _ in range(3)]
    out = run_market(np.stack([expert, *guessers]), labels, MarketParams(self_weight=0.0))
    assert not out.distill[0]
    assert out.distill[1:].all()
    ungated = run_market(np.stack([expert, *guessers]), labels,
                         MarketParams(self_weight=0.0, gate=False))
    assert ungated.distill.all()


def test_adaptive_scores_on_held_out_rows_only():
    """Teacher 1 is sure and right on the rows clients distill on but knows nothing of the
    held-out rows (it has memorised the others); teacher 2 is right everywhere with less
    confidence. Scored on the held-out rows, client 0 learns from teacher 2; scored on
    every row, the memoriser's false confidence buys it a large share."""
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 4, 400)
    held_out = np.zeros(400, dtype=bool)
    held_out[:100] = True
    student = rng.normal(0, 1.0, (400, 4))
    memoriser = 8.0 * np.eye(4)[labels]
    memoriser[held_out] = 0.0
    honest = 1.5 * np.eye(4)[labels] + rng.normal(0, 0.3, (400, 4))
    logits = np.stack([student, memoriser, honest])
    params = MarketParams(self_weight=0.0, prior_correction=False)
    out = run_market(logits, labels, params, held_out=held_out)
    assert out.weights[0, 2] > 0.9
    everywhere = run_market(logits, labels, params)
    assert everywhere.weights[0, 1] > out.weights[0, 1] + 0.3


def test_prior_correction_swaps_the_teachers_prior_for_the_students():
    """A teacher that only knows its own prior passes on the student's prior instead."""
    rng = np.random.default_rng(11)
    num = 2000
    student = np.log(np.array([0.7, 0.1, 0.1, 0.1]))[None].repeat(num, 0)
    teacher = np.log(np.array([0.1, 0.1, 0.1, 0.7]))[None].repeat(num, 0)
    logits = np.stack([student, teacher]) + rng.normal(0, 1e-3, (2, num, 4))
    weights = np.array([[0.0, 1.0], [1.0, 0.0]])
    for space in ("logit", "prob"):
        corrected = soft_targets(logits, weights, space=space, priors=class_prior(logits))
        np.testing.assert_allclose(corrected[0].mean(0), [0.7, 0.1, 0.1, 0.1], atol=1e-2)
        plain = soft_targets(logits, weights, space=space)
        np.testing.assert_allclose(plain[0].mean(0), [0.1, 0.1, 0.1, 0.7], atol=1e-2)


def test_soft_targets_logit_space_by_hand():
    logits = np.array([[[2.0, 0.0]], [[0.0, 2.0]]])
    targets = soft_targets(logits, np.array([[0.5, 0.5], [1.0, 0.0]]), temperature=1.0, space="logit")
    np.testing.assert_allclose(targets[0, 0], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(targets[1, 0], softmax(np.array([2.0, 0.0])), atol=1e-6)


LEARNED = MarketParams(weighting="learned", self_weight=0.0)


def _one_hot_logits(pred, num_classes=4, scale=6.0):
    out = np.zeros((len(pred), num_classes))
    out[np.arange(len(pred)), pred] = scale
    return out


def test_learned_weights_favour_the_teacher_that_knows_the_labels():
    """Client 0 is learnt; client 1 always predicts the true label, client 2 always a
    wrong one: KT-pFL-style coefficients put (almost) all of client 0's weight on 1."""
    labels = np.arange(40) % 4
    logits = np.stack([
        _one_hot_logits(np.zeros(40, int)),  # the student: always class 0
        _one_hot_logits(labels),  # knows the labels
        _one_hot_logits((labels + 1) % 4),  # always wrong
    ])
    out = run_market(logits, labels, LEARNED)
    np.testing.assert_allclose(out.weights.sum(axis=1), 1.0)
    assert out.weights[0, 0] == 0.0 and out.weights[0, 1] > 0.8 > 0.1 > out.weights[0, 2]
    np.testing.assert_allclose(out.targets.sum(axis=-1), 1.0, atol=1e-5)


def test_learned_weights_prior_pulls_to_uniform():
    labels = np.arange(40) % 4
    logits = np.stack([_one_hot_logits(labels), _one_hot_logits(labels), _one_hot_logits((labels + 1) % 4)])
    strong = run_market(logits, labels, MarketParams(weighting="learned", self_weight=0.0, learn_prior=1e4))
    np.testing.assert_allclose(strong.weights[0, 1:], [0.5, 0.5], atol=0.02)
    with_self = run_market(logits, labels, MarketParams(weighting="learned", self_weight=0.3))
    np.testing.assert_allclose(np.diag(with_self.weights), 0.3)
