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
from kta_flwr.maths.market import cap_loudness, centre, consistent_accuracy, run_market, sybil_shares

N, C, HONEST = 200, 5, 8


def _honest(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[8, N, C]`` logits of clients right on ~75 % of the rows, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N)
    logits = rng.normal(0, 1, (HONEST, N, C))
    right = rng.random((HONEST, N)) < 0.75
    guess = np.where(right, labels[None], rng.integers(0, C, (HONEST, N)))
    np.put_along_axis(logits, guess[..., None], 4.0, axis=-1)
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
    held_out = held_out_mask(N, 0.2, 0)
    attacked = np.concatenate([logits, _gamers(labels, held_out)])
    undefended = run_market(attacked, labels, _kta(consistency=False, sybil_divergence=0.0), held_out)
    defended = run_market(attacked, labels, _kta(), held_out)
    clean = run_market(logits, labels, _kta(), held_out)
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
