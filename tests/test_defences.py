"""The market's defences (kta_flwr.maths.market) against constructed attackers, and the
attack layer's uploads (kta_flwr.client.attacks)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kta_flwr.client.attacks import attackers, poisoned_logits
from kta_flwr.config import LOGIT_ATTACKS, RunConfig
from kta_flwr.factory import market_params
from kta_flwr.flower.protocol import held_out_mask
from kta_flwr.maths.market import (
    cap_loudness, centre, class_information, class_prior, class_weights, consistent_accuracy,
    label_information, run_market, scoring_weights, soft_targets, sybil_shares, with_labels,
)

N, C, HONEST = 200, 5, 8


def _honest(seed: int = 0, unsure: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """``[8, N, C]`` logits of clients right on ~75 % of the rows (logit 4 on the label),
    and the labels; elsewhere they guess a class with logit ``unsure``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N)
    logits = rng.normal(0, 1, (HONEST, N, C))
    right = rng.random((HONEST, N)) < 0.75
    guess = np.where(right, labels[None], rng.integers(0, C, (HONEST, N)))
    np.put_along_axis(logits, guess[..., None], np.where(right, 4.0, unsure)[..., None], axis=-1)
    return logits, labels


def _kta(**changes) -> object:
    return replace(market_params(RunConfig()), **changes)


def _gamers(labels: np.ndarray, held_out: np.ndarray, count: int = 2) -> np.ndarray:
    cfg = RunConfig(attack="gaming", attack_fraction=0.2)
    one = poisoned_logits(cfg, "gaming", np.zeros((N, C), np.float32), labels, held_out, 0)
    return np.stack([one] * count)


def _honest_distilled_accuracy(out, labels: np.ndarray, held_out: np.ndarray) -> float:
    """Mean accuracy of the honest clients' targets on the rows they distill on."""
    return float(np.mean([(out.targets[k][~held_out].argmax(-1) == labels[~held_out]).mean()
                          for k in range(HONEST)]))


def test_gaming_attackers_lose_their_weight_to_the_consistency_check():
    logits, labels = _honest()
    held_out = held_out_mask(N, 0.2, 0)  # known to the gamers: the worst case
    attacked = np.concatenate([logits, _gamers(labels, held_out)])
    accuracy = _kta(teacher_quality="accuracy", loudness_cap=0.0)
    undefended = run_market(attacked, labels, replace(accuracy, consistency=False, sybil_divergence=0.0),
                            held_out)
    defended = run_market(attacked, labels, accuracy, held_out)
    clean = run_market(logits, labels, accuracy, held_out)
    weight = lambda out: out.weights[:HONEST, HONEST:].sum(axis=1).mean()  # noqa: E731
    assert weight(undefended) > 0.05  # the attack buys weight on the undefended market ...
    assert weight(defended) < 0.01  # ... and not on kta's
    assert defended.accuracy[HONEST:].max() == 0.0  # right only where scored: judged by its worse rows
    gap = _honest_distilled_accuracy(clean, labels, held_out) - _honest_distilled_accuracy(defended, labels, held_out)
    assert abs(gap) < 0.01


def test_consistent_accuracy_is_the_worse_of_both_kinds_of_rows():
    labels = np.array([0, 1, 0, 1])
    held_out = np.array([True, True, False, False])
    logits = np.eye(2)[[[0, 1, 1, 0], [0, 1, 0, 1]]]  # client 0: right on held-out only
    np.testing.assert_array_equal(consistent_accuracy(logits, labels, held_out), [0.0, 1.0])


def test_identical_uploads_share_one_teachers_weight():
    divergence = np.array([[0.0, 0.0, 0.3], [0.0, 0.0, 0.3], [0.3, 0.3, 0.0]])
    np.testing.assert_array_equal(sybil_shares(divergence, 1e-5), [0.5, 0.5, 1.0])
    np.testing.assert_array_equal(sybil_shares(divergence, 0.0), [1.0, 1.0, 1.0])
    chain = np.array([[0, 1e-6, 1], [1e-6, 0, 1e-6], [1, 1e-6, 0]], float)  # transitive
    np.testing.assert_allclose(sybil_shares(chain, 1e-5), [1 / 3] * 3)


def test_sybils_gain_no_weight_by_numbers():
    logits, labels = _honest(1)
    held_out = held_out_mask(N, 0.2, 0)
    wrong = np.eye(C)[(labels + 1) % C] * 3.0
    one = run_market(np.concatenate([logits, wrong[None]]), labels, _kta(), held_out)
    four = run_market(np.concatenate([logits, np.stack([wrong] * 4)]), labels, _kta(), held_out)
    np.testing.assert_allclose(four.weights[:HONEST, HONEST:].sum(axis=1),
                               one.weights[:HONEST, HONEST], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("extreme", [1e20, -1e20, 1e6])
def test_no_single_extreme_uploader_withholds_the_honest_clients_targets(extreme):
    logits, labels = _honest(2)
    held_out = held_out_mask(N, 0.2, 0)
    clean = run_market(logits, labels, _kta(), held_out)
    constant = np.full((1, N, C), extreme)
    attacked = run_market(np.concatenate([logits, constant]), labels, _kta(), held_out)
    assert attacked.distill[:HONEST].sum() >= clean.distill.sum() > 0
    assert np.isfinite(attacked.targets).all()


def test_centring_and_the_loudness_cap():
    z = np.array([[[1e20, 1e20, 1e20], [3.0, 0.0, 0.0]]])
    np.testing.assert_array_equal(centre(z)[0, 0], [0.0, 0.0, 0.0])
    loud = np.stack([np.ones((2, 3)) * [1.0, -1.0, 0.0] * s for s in (1.0, 1.0, 1.0, 100.0)])
    capped = cap_loudness(loud, 2.0)
    np.testing.assert_array_equal(capped[:3], loud[:3])
    np.testing.assert_allclose(np.linalg.norm(capped[3], axis=-1), 2.0 * np.sqrt(2.0))
    assert cap_loudness(loud, 0.0) is loud


def test_attackers_are_a_seeded_share_of_the_partitions():
    cfg = RunConfig(attack="gaming", attack_fraction=0.2)
    chosen = attackers(cfg, 10)
    assert len(chosen) == 2 and chosen == attackers(cfg, 10)
    assert len(attackers(cfg.replace(attack_fraction=0.3), 10)) == 3
    assert attackers(RunConfig(), 10) == frozenset()


@pytest.mark.parametrize("attack", LOGIT_ATTACKS)
def test_logit_attacks_upload_what_they_say(attack):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, C, N)
    held_out = held_out_mask(N, 0.2, 0)
    honest = rng.normal(size=(N, C)).astype(np.float32)
    cfg = RunConfig(attack=attack, attack_fraction=0.2)
    out = poisoned_logits(cfg, attack, honest, labels, held_out, seed=5)
    assert out.shape == (N, C) and np.isfinite(out).all()
    predicted = out.argmax(axis=1)
    if attack == "gaming":
        assert (predicted[held_out] == labels[held_out]).all()
        assert not (predicted[~held_out] == labels[~held_out]).any()
    if attack in ("confident-wrong", "sybil", "rolled"):
        assert not (predicted == honest.argmax(1) if attack == "rolled" else predicted == labels).any()
    if attack in ("cpa", "celmax"):  # never the class the attacker itself predicts
        assert not (predicted == honest.argmax(axis=1)).any()
    if attack == "budgeted":  # wrong on a budget of the rows it thinks distilled, loud
        wrong = predicted != labels
        assert not wrong[held_out].any() and wrong[~held_out].sum() == round(0.2 * (~held_out).sum())
        assert np.abs(out).max() == cfg.attack_scale
        quiet = poisoned_logits(cfg.replace(attack_scale=0.0), attack, honest, labels, held_out, seed=5)
        np.testing.assert_array_equal(np.sort(quiet, axis=1), np.sort(honest, axis=1))  # its own loudness
        np.testing.assert_array_equal(quiet.argmax(1) != labels, wrong)  # the same rows, shared
        noisy = poisoned_logits(cfg.replace(attack_noise=0.5), attack, honest, labels, held_out, seed=6)
        assert 0.4 < (noisy - out).std() < 0.6  # its own noise: not a near-copy of another attacker
    if attack == "sybil":  # every attacker uploads the same rows, whatever its own model
        other = poisoned_logits(cfg, attack, rng.normal(size=(N, C)).astype(np.float32), labels, held_out, 9)
        np.testing.assert_array_equal(out, other)


def test_attack_config_is_checked():
    from kta_flwr.config import ConfigError, parse_run_config  # pylint: disable=import-outside-toplevel

    with pytest.raises(ConfigError, match="'attack' = 'gaming' does not apply to strategy 'fedavg'"):
        parse_run_config({"strategy": "fedavg", "attack": "gaming"})
    with pytest.raises(ConfigError, match="'attack-fraction'"):
        parse_run_config({"attack": "gaming", "attack-fraction": 1.0})
    with pytest.raises(ConfigError, match="'attack' = 'backdoor' is not allowed"):
        parse_run_config({"attack": "backdoor"})
    with pytest.raises(ConfigError, match="'trim-beta'"):
        parse_run_config({"strategy": "fedtrimmedavg", "trim-beta": 0.5})
    with pytest.raises(ConfigError, match=r"'score-uniform-share' = 1.5 must be in \[0, 1\]"):
        parse_run_config({"score-uniform-share": 1.5})
    with pytest.raises(ConfigError, match=r"'class-quality' = true needs 'teacher-quality' = 'information'"):
        parse_run_config({"class-quality": True, "teacher-quality": "accuracy"})


def _targets(uploads: np.ndarray, weights: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """kta's targets step for fixed ``weights``: centred, loudness-capped, prior-corrected
    logit mix at T = 3; and each row's median teacher norm ``[N]``."""
    centred = centre(uploads)
    targets = soft_targets(cap_loudness(centred, cap), weights, temperature=3.0, space="logit",
                           priors=class_prior(centred))
    return targets, np.median(np.linalg.norm(centred, axis=-1), axis=0)


@pytest.mark.parametrize("cap", [2.0, 0.0])
def test_one_teachers_pull_on_a_row_is_bounded_by_the_loudness_cap(cap):
    """docs/robustness.md: with the weights fixed, whatever teacher ``a`` uploads moves a
    student's target logits on row i (``T log q``, up to a constant) by a range of at most
    ``W[k, a] (sqrt(2) c (m_i + m'_i) + 2 ln(1e4 (1 + C 1e-4)))``, ``m_i`` the row's median
    teacher norm. Without the cap (c = 0) a loud teacher breaks it."""
    rng = np.random.default_rng(7)
    honest = rng.normal(0, 1, (6, N, C))  # rows of norm 3 to 5: none of them capped
    honest *= rng.uniform(3, 5, (6, N, 1)) / np.linalg.norm(centre(honest), axis=-1, keepdims=True)
    weights = rng.dirichlet(np.ones(7), size=7)
    labels = rng.integers(0, C, N)
    quiet = np.concatenate([honest, honest[:1]])
    loud = np.concatenate([honest, 90.0 * np.eye(C)[(labels + 1) % C][None]])
    (q_quiet, m_quiet), (q_loud, m_loud) = _targets(quiet, weights, cap), _targets(loud, weights, cap)
    pull = 3.0 * (np.log(q_loud[:6]) - np.log(q_quiet[:6]))  # [6, N, C]: the honest students
    spread = pull.max(axis=-1) - pull.min(axis=-1)  # [6, N]
    bound = weights[:6, 6:7] * (np.sqrt(2) * 2.0 * (m_quiet + m_loud)[None] + 2 * np.log(1e4 * (1 + C * 1e-4)))
    if cap > 0:
        assert (spread <= bound + 1e-4).all()
    else:
        assert (spread > bound).any()


def test_budgeted_attackers_lose_their_weight_when_the_scored_rows_are_secret():
    """Two loud budgeted attackers (true labels, but wrong on 30 % of the rows they think
    are distilled) among honest clients that are less sure where they are wrong: on the
    old market (accuracy quality, no loudness cap, held-out rows known to the attackers)
    they buy weight and poison the honest targets; on kta's (secret rows: they guessed
    the last round's, likelihood quality, cap 2) they get a fifth of it, and the honest
    targets stay as good as in the clean market."""
    logits, labels = _honest(3, unsure=2.0)
    scored, last_rounds = held_out_mask(N, 0.2, 11), held_out_mask(N, 0.2, 12)
    cfg = RunConfig(attack="budgeted", attack_fraction=0.2, attack_scale=90.0, attack_budget=0.3)

    def attackers_for(belief: np.ndarray) -> np.ndarray:
        return np.stack([poisoned_logits(cfg, "budgeted", logits[k].astype(np.float32), labels, belief,
                                         seed=k, server_round=2) for k in (0, 1)])

    old = _kta(teacher_quality="accuracy", loudness_cap=0.0)
    undefended = run_market(np.concatenate([logits, attackers_for(scored)]), labels, old, scored)
    defended = run_market(np.concatenate([logits, attackers_for(last_rounds)]), labels, _kta(), scored)
    clean = run_market(logits, labels, _kta(), scored)
    weight = lambda out: out.weights[:HONEST, HONEST:].sum(axis=1).mean()  # noqa: E731
    assert weight(undefended) > 0.1 and weight(defended) < weight(undefended) / 5
    right = lambda out: _honest_distilled_accuracy(out, labels, scored)  # noqa: E731
    assert right(undefended) < right(clean) - 0.05
    assert abs(right(defended) - right(clean)) < 0.01


def test_label_information_counts_nats_above_a_uniform_guess():
    labels = np.arange(C).repeat(4)  # [20], every class 4 times
    sure = 50.0 * np.eye(C)[labels]  # right with probability ~1
    teachers = np.stack([sure, np.zeros_like(sure), -sure, np.roll(sure, 1, axis=-1)])
    weights = np.ones((1, len(labels)))
    info = label_information(teachers, labels, weights)[0]
    np.testing.assert_allclose(info, [np.log(C), 0.0, 0.0, 0.0], atol=1e-6)
    # a teacher that knows classes 0 and 1 only: worth log C to a student of those
    # classes; to a student of the others, with its own prior taken out, at most "not 0
    # or 1" (log C/3), not its confident answers on its own classes
    knows = np.where(np.isin(labels, [0, 1])[:, None], sure, 0.0)[None]
    students = np.stack([np.isin(labels, [0, 1]), np.isin(labels, [2, 3, 4])]).astype(float)
    info = label_information(knows, labels, students, class_prior(knows))[:, 0]
    assert info[0] == pytest.approx(np.log(C), abs=1e-3) and 0.0 < info[1] <= np.log(C / 3)


def _skewed(seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``[8, N, C]`` label-skewed honest clients: the first four know classes 0-2, the
    others 2-4 (right on ~75 % of their classes' rows); elsewhere they guess among the
    classes they know."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N)
    logits = rng.normal(0, 1, (HONEST, N, C))
    for k in range(HONEST):
        known = np.arange(3) + (2 if k >= 4 else 0)
        right = np.isin(labels, known) & (rng.random(N) < 0.75)
        guess = np.where(right, labels, rng.choice(known, N))
        np.put_along_axis(logits[k], guess[:, None], np.where(right, 4.0, 2.0)[:, None], axis=-1)
    return logits, labels


@pytest.mark.parametrize("attack", ["sign-flip", "rolled"])
def test_teachers_worse_than_a_uniform_guess_get_no_weight(attack):
    """Under label skew an honest teacher is often right on few of a student's rows, so
    an inverted or rolled upload can score like one by likelihood; by information above a
    uniform guess (kta's quality) it gets nothing, while the honest teachers keep their
    weight with the students that share their classes."""
    logits, labels = _skewed()
    held_out = held_out_mask(N, 0.2, 5)
    cfg = RunConfig(attack=attack, attack_fraction=0.2)
    bad = np.stack([poisoned_logits(cfg, attack, logits[k].astype(np.float32), labels, held_out, k, 2)
                    for k in (0, 4)])
    attacked = np.concatenate([logits, bad])
    weight = lambda out: out.weights[:HONEST, HONEST:].sum(axis=1)  # noqa: E731
    by_likelihood = run_market(attacked, labels, _kta(teacher_quality="likelihood"), held_out)
    by_information = run_market(attacked, labels, _kta(), held_out)
    assert weight(by_likelihood).min() > 0.002
    assert weight(by_information).max() == 0.0
    same_side = by_information.weights[:4, :4].sum(axis=1) - np.diag(by_information.weights)[:4]
    assert (same_side > by_information.weights[:4, 4:HONEST].sum(axis=1)).all()


def test_a_uniform_share_counts_a_teachers_errors_on_classes_the_student_lacks():
    """A student that holds no 4s weighs the scored rows of class 4 by its class marginal
    (~0), so a teacher sure and wrong on every 4 scores like a perfect one; with half of
    each row's weight uniform (``score-uniform-share = 0.5``) those errors count."""
    labels = np.random.default_rng(2).integers(0, C, N)
    right = 8.0 * np.eye(C)[labels]
    wrong_on_4 = 8.0 * np.eye(C)[np.where(labels == 4, 0, labels)]
    priors = np.array([[0.25, 0.25, 0.25, 0.25, 1e-4], [0.2] * C])
    priors /= priors.sum(axis=1, keepdims=True)
    scores = {u: label_information(np.stack([right, wrong_on_4]), labels, scoring_weights(priors, labels, u))
              for u in (0.0, 0.5)}
    assert scores[0.0][0, 1] == pytest.approx(scores[0.0][0, 0], abs=0.01)  # not counted
    assert scores[0.5][0, 0] - scores[0.5][0, 1] > 0.5  # counted
    np.testing.assert_allclose(scoring_weights(priors, labels, 0.5),
                               0.5 * priors[:, labels] + 0.5 / C)
    assert scores[0.0][1, 1] == pytest.approx(scores[0.5][1, 1])  # a uniform student: the same


def test_class_quality_drops_a_teacher_on_the_class_it_flips_and_keeps_each_teacher_on_its_classes():
    """Label skew: teacher 0 knows classes 0-2 (a uniform guess on 3-4), teacher 1 knows
    3-4; teacher 2 is sure and right but on the 0s and 4s, which it swaps (unsure). By the
    class of each row teacher 2 weighs nothing on the 0s and 4s, teacher 0 nothing on the
    3s and 4s, and a student with no informative teacher on a class keeps its own
    predictions there; with one quality per teacher, student 1 (it knows the 4s) is
    taught 0 on its 4s by teachers 0 and 2 (the defence removed, this fails). The prior
    correction is off: it would give teacher 0's uniform rows to its rare classes 3-4; so
    is the label share, which alone would keep the 4s on top."""
    labels = np.random.default_rng(3).integers(0, C, N)
    one_hot = 8.0 * np.eye(C)[labels]
    knows = lambda classes: np.where(np.isin(labels, classes)[:, None], one_hot, 0.0)  # noqa: E731
    swapped = np.isin(labels, [0, 4])[:, None]
    flipper = np.where(swapped, 3.0 * np.eye(C)[np.choose(labels, [4, 1, 2, 3, 0])], one_hot)
    logits = np.stack([knows([0, 1, 2]), knows([3, 4]), flipper])
    held_out = held_out_mask(N, 0.2, 0)
    scored = held_out.nonzero()[0]
    per_class = class_information(logits[:, scored], labels[scored])
    np.testing.assert_allclose(per_class, np.log(C) * np.array(
        [[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]), atol=0.01)
    by_class = class_weights(np.full((3, 3), 1.0 / 3), np.ones((3, 3)), per_class)  # [C, K, J]
    np.testing.assert_allclose(by_class.sum(axis=2), 1.0)
    # (a student's own weight is floored, as in teacher_weights)
    assert by_class[4, :2, 2].max() == 0.0 and by_class[3, 1:, 0].max() == 0.0
    assert (by_class[4, :, 1] > 0.99).all()
    alone = class_weights(np.array([[0.0, 0.0, 1.0]] * 3), np.ones((3, 3)), per_class)
    np.testing.assert_array_equal(alone[4], np.eye(3))  # nobody but teacher 2, wrong on 4s
    fours = labels[~held_out] == 4
    for wanted in (True, False):
        out = run_market(logits, labels, _kta(class_quality=wanted, gate=False, prior_correction=False, label_share=0.0),
                         held_out, target_rows=~held_out)
        assert (out.targets[:, fours].mean(axis=1).argmax(axis=-1) == 4).all() == wanted


def test_label_share_puts_that_share_on_the_label_and_scales_the_mix():
    targets = np.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]], np.float32)
    mixed = with_labels(targets, np.array([1, 0]), 0.2)
    np.testing.assert_allclose(mixed, [[[0.4, 0.44, 0.16], [0.28, 0.48, 0.24]]], rtol=1e-6)
    assert mixed.dtype == np.float32
    np.testing.assert_allclose(mixed.sum(axis=-1), 1.0, rtol=1e-6)


def test_with_a_label_share_no_teacher_takes_a_row_off_its_label():
    """Two loud teachers right everywhere but on the 0s, which they call C-1, among unsure
    honest teachers: they keep their weight (they are right on most rows) and take some
    honest students' targets off the label on the 0s; with ``label_share`` = s every
    target row gives its label at least s and, here, ranks it first (removing the share,
    this fails)."""
    logits, labels = _honest(unsure=3.0)
    loud = 12.0 * np.eye(C)[np.where(labels == 0, C - 1, labels)]
    attacked = np.concatenate([0.5 * logits, np.stack([loud, loud + 0.01])])
    held_out = held_out_mask(N, 0.2, 0)
    zeros = labels[~held_out] == 0
    undefended = _kta(gate=False, sybil_divergence=0.0, teacher_quality="accuracy", loudness_cap=0.0)
    for share in (0.0, RunConfig().label_share):
        out = run_market(attacked, labels, replace(undefended, label_share=share), held_out,
                         target_rows=~held_out)
        assert out.weights[:HONEST, HONEST:].sum(axis=1).min() > 0.2  # the attackers are paid
        on_zeros = out.targets[:HONEST][:, zeros]  # [8, rows of class 0, C]
        assert on_zeros[..., 0].min() >= share
        assert (on_zeros.argmax(axis=-1) == 0).all() == (share > 0)


@pytest.mark.parametrize("strategy", ["fedmd", "ktpfl"])
def test_the_market_baselines_stay_as_published_whatever_kta_options_are_set(strategy):
    """kta's defences are kta's: FedMD and KT-pFL run their published rules even when the
    run config turns every defence and scoring option on."""
    cfg = RunConfig(strategy=strategy, class_quality=True, score_uniform_share=0.5, loudness_cap=3.0,
                    sybil_divergence=1e-3, label_share=0.2)
    params = market_params(cfg)
    assert params.label_share == 0.0
    assert (params.class_quality, params.score_uniform_share, params.loudness_cap, params.sybil_divergence,
            params.teacher_quality, params.prior_correction) == (False, 0.0, 0.0, 0.0, "accuracy", False)
    assert market_params(RunConfig(strategy="kta", class_quality=True)).class_quality
    assert market_params(RunConfig(strategy="fedavg", class_quality=True)) is None  # no market at all
