"""The fast market kernels equal the direct transcription of the formulas (the market every
result up to v0.18 came from): same divergences, teacher weights, targets, tau and gate
decisions, on random and constructed cases up to K = 50 (issue 19)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from kta_flwr.maths import market_kernels as fast
from kta_flwr.maths import market_reference as reference
from kta_flwr.config import ConfigError
from kta_flwr.task.market_torch import market_kernels, torch_kernels
from kta_flwr.maths.market import (
    MarketParams,
    candidate_weights,
    centre,
    class_prior,
    label_likelihood,
    neighbour_mask,
    probabilities,
    run_market,
    similarity_graph,
    softmax,
    teacher_weights,
    with_background,
)

TOLERANCE = 1e-5
#: The numpy kernels (the default) and the torch ones (``market-device``), here on the CPU.
KERNELS = {"numpy": fast.FAST, "torch": torch_kernels(torch.device("cpu"))}
KTA = {"temperature": 3.0, "consistency": True, "sybil_divergence": 1e-5}
VARIANTS = {
    "kta default": MarketParams(**KTA),
    "logit space": MarketParams(**KTA, target_space="logit"),
    "top-3 teachers": MarketParams(**KTA, neighbours=3),
    "run default (logit, self 0)": MarketParams(**KTA, target_space="logit", self_weight=0.0),
    "run default, top-3": MarketParams(**KTA, target_space="logit", self_weight=0.0, neighbours=3),
    "self weight 0.3": MarketParams(**KTA, self_weight=0.3),
    "no prior correction, T=1": MarketParams(prior_correction=False),
    "fixed tau": MarketParams(adaptive=False, tau=0.01, temperature=2.0),
    "skl": MarketParams(**{**KTA, "divergence": "skl"}),
    "cosine": MarketParams(**{**KTA, "divergence": "cosine"}),
    "hellinger, top-3": MarketParams(**KTA, divergence="hellinger", neighbours=3),
    "run default, top-3, background": MarketParams(
        **KTA, target_space="logit", self_weight=0.0, neighbours=3, background=True),
    "hellinger, top-3, background, self competes": MarketParams(
        **KTA, target_space="logit", divergence="hellinger", neighbours=3, background=True),
    "fixed tau, top-3, background": MarketParams(
        adaptive=False, tau=0.05, temperature=2.0, target_space="logit", neighbours=3,
        background=True),
    "fedmd (uniform)": MarketParams(weighting="uniform", temperature=3.0),
    "kt-pfl (learned)": MarketParams(weighting="learned", temperature=3.0),
}


def _clients(seed: int, num_clients: int, rows: int = 60, classes: int = 10):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    logits = rng.normal(0, 2, (num_clients, rows, classes)).astype(np.float32)
    skill = rng.uniform(0, 5, (num_clients, 1)).astype(np.float32)
    logits[:, np.arange(rows), labels] += skill  # clients of every quality
    favoured = rng.integers(0, classes, num_clients)
    logits[np.arange(num_clients), :, favoured] += 2.0  # and label skews
    held_out = np.zeros(rows, bool)
    held_out[::4] = True
    return logits, labels, held_out


def _gate_margin(logits, labels, held_out, out, params):
    """|score of the chosen mix - the client's own score|: the gate's decision is only
    defined away from a tie (a mix that is the client itself scores as the client)."""
    rows = np.flatnonzero(held_out)
    z = logits[:, rows] - logits[:, rows].mean(-1, keepdims=True)
    weights_for = class_prior(logits)[:, labels[rows]]
    priors = class_prior(logits) if params.prior_correction else None
    chosen = reference.soft_targets(z, out.weights, temperature=1.0, space=params.target_space,
                                    priors=priors)
    return np.abs(label_likelihood(chosen, labels[rows], weights_for)
                  - label_likelihood(softmax(z, 1.0), labels[rows], weights_for))


def assert_same_market(logits, labels, held_out, params, kernels=fast.FAST):
    new = run_market(logits, labels, params, held_out, kernels=kernels)
    old = run_market(logits, labels, params, held_out, kernels=reference.REFERENCE)
    np.testing.assert_allclose(new.divergence, old.divergence, atol=TOLERANCE)
    np.testing.assert_allclose(new.weights, old.weights, atol=TOLERANCE)
    np.testing.assert_allclose(new.targets, old.targets, atol=TOLERANCE)
    np.testing.assert_array_equal(new.tau, old.tau)
    decided = _gate_margin(logits, labels, held_out, old, params) > 1e-6
    np.testing.assert_array_equal(new.distill[decided], old.distill[decided])
    return new


@pytest.mark.parametrize("kernels", list(KERNELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("num_clients", [2, 9, 50])
def test_fast_market_equals_reference_on_random_clients(variant, num_clients, kernels):
    logits, labels, held_out = _clients(num_clients, num_clients)
    assert_same_market(logits, labels, held_out, VARIANTS[variant], KERNELS[kernels])


@pytest.mark.parametrize("kernels", list(KERNELS))
def test_fast_market_equals_reference_on_constructed_cases(kernels):
    logits, labels, held_out = _clients(7, 12)
    sybils = np.concatenate([logits, np.repeat(logits[:1], 5, axis=0)])  # 6 identical uploads
    loud = logits.copy()
    loud[3] *= 40.0  # a client shouting near the boundary's logit bound
    confident = np.where(np.eye(10, dtype=bool)[labels][None], 50.0, -50.0).astype(np.float32)
    disjoint = np.concatenate([logits, np.roll(confident, 1, axis=-1), confident])
    for case in (sybils, loud, disjoint, logits[:1]):
        for params in (VARIANTS["kta default"], VARIANTS["top-3 teachers"],
                       VARIANTS["run default, top-3"]):
            out = assert_same_market(case, labels, held_out, params, KERNELS[kernels])
            np.testing.assert_allclose(out.targets.sum(-1), 1.0, atol=1e-5)
    out = assert_same_market(sybils, labels, held_out, VARIANTS["kta default"], KERNELS[kernels])
    assert out.weights[0, -1] == pytest.approx(out.weights[0, -2])  # the copies share alike


@pytest.mark.parametrize("kind", fast.DIVERGENCES)
def test_divergence_kernel_on_floored_and_peaked_predictions(kind):
    probs = softmax(np.random.default_rng(3).normal(0, 8, (20, 30, 7)))  # many ~0 entries
    probs[0, :5] = np.eye(7)[:5]  # exact zeros: floored at 1e-12 by both
    want = reference.pairwise_divergence(probs, kind)
    for workers in (1, 2):
        got = fast.pairwise_divergence(probs.astype(np.float32), kind, workers=workers,
                                       block_bytes=4096)  # many small blocks
        np.testing.assert_allclose(got, want, atol=1e-7)


@pytest.mark.parametrize("columns, tile, students", [(16, 48, 4), (7, 7, 3), (1000, 1000, 25)])
def test_js_tiles_and_student_groups_do_not_change_the_graph(monkeypatch, columns, tile, students):
    """Tiles of 1 to 6 teachers, column chunks with a short last one, student groups that
    straddle the tiles: every pair is summed once, as by the direct formula."""
    probs = softmax(np.random.default_rng(5).normal(0, 3, (23, 30, 7)))
    want = reference.pairwise_divergence(probs, "js")
    monkeypatch.setattr(fast, "_JS_COLUMNS", columns)
    monkeypatch.setattr(fast, "_JS_TILE", tile)
    monkeypatch.setattr(fast, "_JS_STUDENTS", students)
    for workers in (1, 2):
        got = fast.pairwise_divergence(probs.astype(np.float32), "js", workers=workers)
        np.testing.assert_allclose(got, want, atol=1e-7)


def test_blocked_targets_and_scores_do_not_depend_on_block_size():
    logits, labels, _ = _clients(11, 30)
    weights = np.random.default_rng(4).dirichlet(np.ones(30), size=(3, 30))
    priors = class_prior(logits)
    whole = fast.soft_targets(logits, weights[0], temperature=3.0, priors=priors)
    blocked = fast.soft_targets(logits, weights[0], temperature=3.0, priors=priors, block_bytes=1)
    np.testing.assert_allclose(blocked, whole, atol=1e-7)
    scores = fast.label_probability(logits, labels, weights, priors=priors)
    np.testing.assert_allclose(
        fast.label_probability(logits, labels, weights, priors=priors, block_bytes=1), scores, atol=1e-12)
    np.testing.assert_allclose(
        scores, reference.label_probability(logits, labels, weights, priors=priors), atol=1e-6)
    sparse = np.where(neighbour_mask(weights[0], 3), weights[0], 0.0)  # 3 teachers each
    for space in ("logit", "prob"):
        whole = fast.soft_targets(logits, sparse, temperature=3.0, space=space, priors=priors)
        for block_bytes in (1, 1000):  # gathered teachers, a few columns at a time
            np.testing.assert_allclose(fast.soft_targets(
                logits, sparse, temperature=3.0, space=space, priors=priors,
                block_bytes=block_bytes), whole, atol=1e-7)
        np.testing.assert_allclose(whole, reference.soft_targets(
            logits, sparse, temperature=3.0, space=space, priors=priors), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_label_softmax_and_the_scaled_one_equal_the_direct_softmax_even_where_it_underflows(dtype):
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 3, (3, 20, 7)).astype(dtype)
    labels = rng.integers(0, 7, 20)
    tolerance = 1e-6 if dtype == np.float32 else 1e-12
    want = softmax(logits.astype(np.float64))[:, np.arange(20), labels]
    got = fast.label_softmax(logits, labels)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=tolerance)
    # Sums in another order (BLAS): a few ulps of the terms' magnitude, not of a sum near 0.
    np.testing.assert_allclose(fast.row_sums(logits), logits.sum(-1), rtol=0,
                               atol=tolerance * np.abs(logits).sum(-1).max())
    # Mixes of non-positive logits, each class scaled by rho: per leading index ([3, C])
    # or one for all ([C]); rows far below 0 underflow in exp and are redone exactly.
    mixed = logits - logits.max(axis=-1, keepdims=True) - rng.uniform(0, 5, (3, 20, 1)).astype(dtype)
    mixed[1, 3:6] -= 800
    for rho in (rng.uniform(0.01, 1, (3, 7)), rng.uniform(0.01, 1, 7)):
        want = softmax(mixed.astype(np.float64) + np.log(rho)[..., None, :])[:, np.arange(20), labels]
        got = fast._scaled_label_softmax(mixed, labels, rho)  # pylint: disable=protected-access
        assert got.dtype == np.float64 and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=10 * tolerance)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_for_each_visits_every_index_once_on_any_number_of_threads(workers):
    seen = np.zeros(37, int)

    def body(i: int) -> None:
        seen[i] += 1

    fast.for_each(37, body, workers=workers)
    np.testing.assert_array_equal(seen, 1)


def test_threaded_student_loops_equal_one_thread(monkeypatch):
    logits, labels, _ = _clients(12, 40)
    weights = np.random.default_rng(5).dirichlet(np.ones(40), size=(3, 40))
    weights[weights < np.sort(weights, axis=-1)[..., -4:-3]] = 0.0  # 4 teachers each: sparse paths
    weights /= weights.sum(-1, keepdims=True)
    priors = class_prior(logits)

    def run() -> list[np.ndarray]:
        return [fast.soft_targets(logits, weights[0], temperature=3.0, priors=priors, space=space)
                for space in ("prob", "logit")] + [
            fast.label_probability(logits, labels, weights, priors=priors, space=space)
            for space in ("prob", "logit")]

    threaded = run()
    monkeypatch.setattr(fast, "threads", lambda workers=None: 1)
    for got, want in zip(threaded, run()):
        np.testing.assert_array_equal(got, want)


def test_divergence_rows_measures_the_graph_on_those_rows_only():
    logits, labels, held_out = _clients(5, 8, rows=100)
    params = MarketParams(**KTA, divergence_rows=20)
    out = run_market(logits, labels, params, held_out)
    rows = np.unique(np.linspace(0, 99, 20).round().astype(int))
    z = logits - logits.mean(-1, keepdims=True)
    want = reference.pairwise_divergence(probabilities(z, 3.0)[:, rows], "js")
    np.testing.assert_allclose(out.divergence, want, atol=1e-7)
    exact = run_market(logits, labels, MarketParams(**KTA), held_out)
    assert not np.allclose(out.divergence, exact.divergence)  # an approximation, as documented


@pytest.mark.parametrize("variant", ["default", "background"])
def test_target_rows_cut_the_targets_and_change_nothing_else(variant):
    logits, labels, held_out = _clients(6, 9, rows=80)
    params = MarketParams(**KTA, **({"neighbours": 3, "target_space": "logit", "background": True}
                                    if variant == "background" else {}))
    every = run_market(logits, labels, params, held_out)
    cut = run_market(logits, labels, params, held_out, target_rows=~held_out)
    assert cut.targets.shape == (9, int((~held_out).sum()), 10)
    np.testing.assert_allclose(cut.targets, every.targets[:, ~held_out], atol=1e-7)
    for name in ("accuracy", "divergence", "similarity", "weights", "tau", "distill", "priors"):
        np.testing.assert_array_equal(getattr(cut, name), getattr(every, name))


def test_gather_writes_the_fancy_index_into_reused_scratch():
    source = np.arange(5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    scratch, index = fast.Scratch(), np.array([4, 0, 2])
    for part in (slice(None), slice(2, 5)):
        got = scratch.gather(source, index, part)
        assert got is scratch.array("gathered", got.shape, got.dtype)  # this thread's array
        np.testing.assert_array_equal(got, source[index, part].reshape(3, -1))
    assert scratch.gather(source, index, slice(1, 4)) is got  # the same shape: the same memory
    with pytest.raises(ValueError, match="C-contiguous"):
        scratch.gather(source.transpose(1, 0, 2), index)


def test_for_each_chunk_covers_every_index_once_in_slices_of_the_size():
    seen = np.zeros(10, int)

    def body(part):
        assert part.stop - part.start <= 3
        seen[part] += 1

    fast.for_each_chunk(10, 3, body, workers=2)
    np.testing.assert_array_equal(seen, 1)


def test_market_device_cuda_fails_fast_without_a_gpu():
    assert market_kernels("cpu") is fast.FAST
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert market_kernels("auto") is fast.FAST  # no GPU: the numpy kernels
    with pytest.raises(ConfigError, match="'market-device' = 'cuda'"):
        market_kernels("cuda")


@pytest.mark.parametrize("kernels", list(KERNELS))
def test_mixes_of_more_teachers_than_students_equal_the_direct_formulas(kernels):
    """Weights ``[K, J]`` over J = K + 1 teachers (the K students first), dense and with
    few teachers each, in both spaces, with and without priors."""
    logits, labels, _ = _clients(13, 41)  # 40 students and one more teacher
    rng = np.random.default_rng(8)
    dense = rng.dirichlet(np.ones(41), size=(2, 40))
    sparse = np.where(dense < np.sort(dense, axis=-1)[..., -4:-3], 0.0, dense)  # 4 teachers
    sparse /= sparse.sum(-1, keepdims=True)
    kernel = KERNELS[kernels]
    for weights in (dense, sparse):
        for priors in (class_prior(logits), None):
            for space in ("prob", "logit"):
                got = kernel.targets(logits, weights[0], temperature=3.0, space=space, priors=priors)
                want = reference.soft_targets(logits, weights[0], temperature=3.0, space=space,
                                              priors=priors)
                assert got.shape == (40, 60, 10)
                np.testing.assert_allclose(got, want, atol=1e-6)
                np.testing.assert_allclose(
                    kernel.label_probability(logits, labels, weights, space=space, priors=priors),
                    reference.label_probability(logits, labels, weights, space=space, priors=priors),
                    atol=1e-6)
    with pytest.raises(ValueError, match="do not mix 40 teachers"):
        fast.soft_targets(logits[:40], dense[0])


@pytest.mark.parametrize("self_weight", [-1.0, 0.0, 0.3])
def test_background_teacher_holds_the_full_weights_beyond_the_nearest(self_weight):
    rng = np.random.default_rng(9)
    divergence = rng.uniform(0, 0.5, (12, 12))
    divergence = (divergence + divergence.T) / 2
    np.fill_diagonal(divergence, 0.0)
    accuracy, shares = rng.uniform(0, 1, 12), rng.uniform(0.5, 1, 12)
    params = MarketParams(neighbours=4, self_weight=self_weight, target_space="logit",
                          background=True, tau_grid=(0.01, 0.1, 10.0))
    taus = np.array(params.tau_grid)
    out = with_background(candidate_weights(divergence, accuracy, params, shares), divergence,
                          accuracy, params, shares, taus)
    assert out.shape == (3, 12, 13)
    nearest = neighbour_mask(-divergence, 4) | np.eye(12, dtype=bool)
    for got, tau in zip(out, taus):
        full = teacher_weights(similarity_graph(divergence, tau), accuracy, neighbours=0,
                               self_weight=self_weight, shares=shares)
        np.testing.assert_allclose(got[:, :12], np.where(nearest, full, 0.0), atol=1e-12)
        np.testing.assert_allclose(got[:, 12], np.where(nearest, 0.0, full).sum(1), atol=1e-12)
    assert out[-1, :, 12].mean() > out[0, :, 12].mean()  # a broad tau leaves more behind
    far = np.where(np.eye(12, dtype=bool), 0.0, 5.0)  # every similarity underflows at tau 0.003
    sharp = replace(params, tau_grid=(0.003,))
    lonely = with_background(candidate_weights(far, accuracy, sharp, shares), far, accuracy,
                             sharp, shares, np.array([0.003]))[0]
    full = teacher_weights(similarity_graph(far, 0.003), accuracy, self_weight=self_weight, shares=shares)
    np.testing.assert_array_equal(lonely[:, :12], full)  # all on the client itself
    np.testing.assert_array_equal(lonely[:, 12], 0.0)


def test_background_targets_are_the_dense_mix_and_vanish_when_every_teacher_is_near():
    logits, labels, held_out = _clients(14, 9)
    params = VARIANTS["run default, top-3, background"]
    out = run_market(logits, labels, params, held_out)
    # The background teacher = each client's share 1/K of the rest: the dense weights'
    # targets, written directly from the formulas.
    want = reference.soft_targets(centre(logits), out.weights, temperature=3.0, space="logit",
                                  priors=class_prior(logits))
    np.testing.assert_allclose(out.targets, want, atol=1e-5)
    np.testing.assert_allclose(out.weights.sum(1), 1.0)
    assert (out.weights > 0).all()  # every client teaches a little through the background
    without = run_market(logits, labels, replace(params, background=False), held_out)
    assert not np.allclose(out.targets, without.targets)
    for neighbours in (8, 20):  # nobody is beyond the m nearest: no background teacher
        a = run_market(logits, labels, replace(params, neighbours=neighbours), held_out)
        b = run_market(logits, labels, replace(params, neighbours=neighbours, background=False), held_out)
        np.testing.assert_array_equal(a.targets, b.targets)
        np.testing.assert_array_equal(a.weights, b.weights)
    with pytest.raises(ValueError, match="background teacher needs target_space='logit'"):
        run_market(logits, labels, replace(params, target_space="prob"), held_out)
