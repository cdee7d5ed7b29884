"""Differential privacy: DP-SGD through Opacus (per-sample clipping, the accountant, the
noise calibrated to a target ε), nodes that report their ε through the real ClientApp
functions, the noisy-logit mechanism, and DP off leaving training untouched."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client_app.app import train
from flwr.app import Context, RecordDict
from kta_flwr.client.privacy import BudgetExceeded, Ledger, planned_calls
from kta_flwr.config import ConfigError, parse_run_config, stored_run_config
from kta_flwr.flower.validation import MAX_CENTRED_LOGIT
from kta_flwr.maths.noisy_logits import logit_noise_std, noisy_logit_bound, noisy_logits
from kta_flwr.task.models import ModelSpec, build_model
from kta_flwr.task.splits import load_client_data
from kta_flwr.task.privacy import (
    PrivateTraining,
    Spend,
    dp_sgd,
    epsilon_spent,
    noise_for_target,
    private_compatible,
)
from kta_flwr.task.training import Optim, distill, train_supervised
from tests.conftest import FakeNode

CPU = torch.device("cpu")


def _mean_ce(x: torch.Tensor, y: torch.Tensor):
    return lambda module, idx: F.cross_entropy(module(x[idx]), y[idx], reduction="sum") / max(1, len(idx))


def test_each_sample_gradient_is_clipped_and_public_terms_are_not():
    """Noise 0, every row sampled, plain SGD at lr 1: the step is minus the mean of the
    per-sample gradients each clipped to ``clip``, plus the public term's gradient whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    clip, before = 0.1, copy.deepcopy(model)
    clipped = []
    for i in range(8):
        before.zero_grad()
        F.cross_entropy(before(x[i:i + 1]), y[i:i + 1]).backward()
        grads = [p.grad.clone() for p in before.parameters()]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        assert norm > 5 * clip  # the clip binds on every sample
        clipped.append([g * min(1.0, clip / (float(norm) + 1e-6)) for g in grads])
    expected = [p.detach() - (sum(c[j] for c in clipped) / 8 + p.detach())
                for j, p in enumerate(before.parameters())]
    private = PrivateTraining(noise_multiplier=0.0, clip=clip)
    dp_sgd(model, torch.optim.SGD(model.parameters(), lr=1.0), private_loss=_mean_ce(x, y),
           private_size=8, sample_rate=1.0, steps=1, private=private, device=CPU, seed=0,
           public_loss=lambda module: 0.5 * sum((p ** 2).sum() for p in model.parameters()))
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    assert private.spent == [Spend(0.0, 1.0, 1)]
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus is gone
    assert list(model.state_dict()) == list(before.state_dict())


def test_noise_is_gaussian_with_std_noise_times_clip_over_batch():
    """Zero gradients (a constant loss of 0 through the model): the step is pure noise of
    std ``noise * clip / expected batch``, seeded."""
    model = nn.Linear(50, 40, bias=False)
    nn.init.zeros_(model.weight)
    x = torch.zeros(20, 50)
    steps = []
    for seed in (1, 1, 2):
        m = copy.deepcopy(model)
        dp_sgd(m, torch.optim.SGD(m.parameters(), lr=1.0), private_loss=lambda module, idx: module(x[idx]).sum() * 0,
               private_size=20, sample_rate=0.5, steps=1, private=PrivateTraining(2.0, 0.5, seed=seed),
               device=CPU, seed=0)
        steps.append(m.weight.detach().clone())
    assert torch.equal(steps[0], steps[1]) and not torch.equal(steps[0], steps[2])
    assert float(steps[0].std()) == pytest.approx(2.0 * 0.5 / 10, rel=0.05)


def test_an_empty_poisson_sample_still_adds_noise():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    start = copy.deepcopy(model.weight.detach())
    private = PrivateTraining(1.0, 1.0)
    loss = dp_sgd(model, torch.optim.SGD(model.parameters(), lr=1.0), private_loss=_mean_ce(x, y),
                  private_size=4, sample_rate=1e-9, steps=2, private=private, device=CPU, seed=0)
    assert loss == 0.0 and not torch.equal(model.weight.detach(), start)


def test_target_epsilon_calibration_and_accounting():
    plan = [(32 / 500, 16)] * 10 + [(0.1, 40)] * 10
    sigma = noise_for_target(3.0, 1e-3, plan)
    spent = epsilon_spent([Spend(sigma, q, s) for q, s in plan], 1e-3)
    assert 2.95 <= spent <= 3.0
    assert epsilon_spent([Spend(sigma * 0.9, q, s) for q, s in plan], 1e-3) > 3.0  # the smallest
    assert epsilon_spent([], 1e-3) == 0.0
    assert epsilon_spent([Spend(0.0, 0.1, 5)], 1e-3) == math.inf
    with pytest.raises(ValueError, match="too small a budget"):
        noise_for_target(1e-6, 1e-3, [(1.0, 10_000)])


def test_plans_count_every_private_pass():
    kta = parse_run_config({"strategy": "kta", "num-server-rounds": 4, "batch-size": 32,
                            "local-epochs": 2, "distill-epochs": 3, "reference-size": 300})
    # stage 1: ceil(100 / 32) = 4 steps/epoch at 0.32; stage 2: 240 distilled rows (20 %
    # held out) -> 8 steps/epoch, the private term at 1/8 of the rows per step
    assert planned_calls(kta, 100, 300) == [(0.32, 8), (0.125, 24)] * 4
    ditto = kta.replace(strategy="ditto")
    assert planned_calls(ditto, 100, 300) == [(0.32, 8), (0.32, 8)] * 4
    ft = kta.replace(strategy="fedavg-ft", evaluate_every=3, finetune_epochs=1)
    assert planned_calls(ft, 100, 300) == [(0.32, 8)] * 4 + [(0.32, 4)] * 2  # rounds 3 and 4
    assert planned_calls(kta.replace(strategy="local"), 10, 300) == [(1.0, 2)] * 4


def test_a_node_reports_its_epsilon_and_stays_within_the_target(tmp_path, server_identity):
    """FedAvg with ``dp-epsilon = 2`` over 3 rounds, through the real ClientApp: ε grows
    every round, ends within the target (the plan is exactly what a FedAvg node does),
    a replayed round costs nothing twice, and a restarted node continues its ledger."""
    node = FakeNode(tmp_path, "fedavg", dp_epsilon=2.0)
    state = build_model("mlp", ModelSpec((64,), 10, 0, 1), 3).state_dict()
    epsilons = []
    for server_round in (1, 2, 3):
        reply = node.call("train", server_round, state)
        epsilons.append(reply.content.metric_records["metrics"]["dp-epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 2.0
    assert epsilons[2] > 1.95
    again = node.call("train", 3, state).content.metric_records["metrics"]["dp-epsilon"]
    assert again == pytest.approx(epsilons[2])
    ledger = Ledger(tmp_path / "fedavg" / "1", "fedavg", lineage=7)
    assert sorted(ledger.entries) == ["1:train", "2:train", "3:train"]
    restarted = FakeNode(tmp_path, "fedavg", dp_epsilon=2.0)  # empty state, same folder
    metrics = restarted.call("train", 2, state).content.metric_records["metrics"]
    assert metrics["dp-epsilon"] == pytest.approx(epsilons[2])  # round 2 replaced, 3 kept
    saved = json.loads((tmp_path / "fedavg" / "1" / "privacy-ledger.json").read_text())
    assert list(saved["runs"]) == ["7"] and saved["runs"]["7"]["strategy"] == "fedavg"
    assert metrics["dp-lifetime-epsilon"] == pytest.approx(metrics["dp-epsilon"])  # one run


def _train_run(node: FakeNode, run_id: int, rounds: int, state: dict) -> list[dict]:
    """``rounds`` train messages of run ``run_id`` on ``node`` (a new run: empty state);
    each reply's metrics."""
    node.context = Context(run_id=run_id, node_id=11, state=RecordDict(), run_config=node.context.run_config,
                           node_config=node.context.node_config)
    out = []
    for server_round in range(1, rounds + 1):
        reply = node.call("train", server_round, state)
        out.append(dict(reply.content.metric_records["metrics"]))
    return out


def test_lifetime_epsilon_composes_every_run_on_the_data(tmp_path, server_identity):
    """Two runs on one node folder (a second run, then a warm start's): the second reports
    its own ε and the accountant's composition of both runs' spends as its lifetime ε."""
    node = FakeNode(tmp_path, "fedavg", dp_epsilon=1.0, num_server_rounds=2)
    state = build_model("mlp", ModelSpec((64,), 10, 0, 1), 3).state_dict()
    first = _train_run(node, 21, 2, state)
    second = _train_run(node, 22, 2, state)
    ledger = Ledger(tmp_path / "fedavg" / "1", "fedavg", lineage=22)
    both = ledger.spends(("train",), other_runs=True)
    assert len(both) == 4 and len(ledger.spends(("train",))) == 2
    assert second[-1]["dp-epsilon"] == pytest.approx(first[-1]["dp-epsilon"])
    assert first[-1]["dp-lifetime-epsilon"] == pytest.approx(first[-1]["dp-epsilon"])
    lifetime = second[-1]["dp-lifetime-epsilon"]
    assert second[-1]["dp-epsilon"] < lifetime < first[-1]["dp-epsilon"] + second[-1]["dp-epsilon"]
    delta = 1.0 / len(load_client_data(node.cfg, 1, 4).train.y)  # dp-delta 0: 1 / its rows
    assert lifetime == pytest.approx(epsilon_spent(both, delta), rel=1e-12)  # the accountant's


def test_a_node_refuses_a_run_past_its_lifetime_budget(tmp_path, server_identity):
    """With ``dp-lifetime-epsilon``, a node whose data already spent ε refuses a run whose
    plan would compose past the budget: an error reply that says so, and nothing changed
    (its model file, its ledger)."""
    state = build_model("mlp", ModelSpec((64,), 10, 0, 1), 3).state_dict()
    node = FakeNode(tmp_path, "ditto", dp_epsilon=1.0, num_server_rounds=2, dp_lifetime_epsilon=1.2)
    first = _train_run(node, 31, 2, state)
    assert first[-1]["dp-lifetime-epsilon"] <= 1.2
    folder = tmp_path / "ditto" / "1"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    node.context = Context(run_id=32, node_id=11, state=RecordDict(), run_config=node.context.run_config,
                           node_config=node.context.node_config)
    with pytest.raises(BudgetExceeded, match="dp-lifetime-epsilon' = 1.2") as refused:
        train(node.message("train", 1, state), node.context)
    assert "1 earlier run(s)" in str(refused.value) and "nothing was trained" in str(refused.value)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert after["ditto.pt"] == before["ditto.pt"]
    runs = json.loads(after["privacy-ledger.json"])["runs"]
    assert runs["31"] == json.loads(before["privacy-ledger.json"])["runs"]["31"]
    assert not runs.get("32", {}).get("entries")  # the refused run spent nothing
    # a budget that fits both runs lets the second train
    roomy = FakeNode(tmp_path, "ditto", dp_epsilon=1.0, num_server_rounds=2, dp_lifetime_epsilon=2.5)
    assert _train_run(roomy, 32, 1, state)[0]["dp-lifetime-epsilon"] <= 2.5


def test_dp_off_is_plain_minibatch_sgd():
    """Without ``dp`` stage 1 is the plain loop: seeded shuffles, mean cross-entropy, SGD
    (bit for bit); DP-SGD on the same data moves the weights elsewhere."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 64)).astype(np.float32), rng.integers(0, 10, 50)
    optim = Optim(lr=0.05, momentum=0.9, weight_decay=5e-4)
    ours = build_model("mlp", ModelSpec((64,), 10, 0, 1), 0)
    plain = copy.deepcopy(ours)
    private = copy.deepcopy(ours)
    train_supervised(ours, x, y, epochs=2, batch_size=16, optim=optim, device=CPU, seed=5)
    sgd, generator = optim.build(plain), torch.Generator().manual_seed(5)
    xs, ys = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(2):
        order = torch.randperm(50, generator=generator)
        for start in range(0, 50, 16):
            idx = order[start:start + 16]
            loss = F.cross_entropy(plain(xs[idx]), ys[idx])
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
    for a, b in zip(ours.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    train_supervised(private, x, y, epochs=2, batch_size=16, optim=optim, device=CPU, seed=5,
                     dp=PrivateTraining(1.0, 1.0))
    assert not torch.equal(next(private.parameters()), next(ours.parameters()))


@pytest.mark.parametrize("name, spec", [
    ("mlp", ModelSpec((64,), 10, 0, 1)), ("cnn", ModelSpec((1, 8, 8), 10, 0, 1)),
    ("simplecnn", ModelSpec((3, 32, 32), 10, 0, 1)),
    ("simplecnn_small", ModelSpec((3, 32, 32), 10, 0, 1)),
    ("resnet18", ModelSpec((3, 32, 32), 10, 0, 1)), ("femnist_cnn", ModelSpec((1, 28, 28), 62, 0, 1)),
    ("textbag", ModelSpec((16,), 4, 500, 1)),
])
def test_every_model_trains_with_dp_sgd(name, spec):
    """Each registered model (MiniLM aside: it works too, at ~3 s a step here) takes DP-SGD
    steps; the text bag's [B, L] input reaches Opacus as flat ids and offsets."""
    rng = np.random.default_rng(0)
    if spec.vocab_size:
        x = rng.integers(0, spec.vocab_size, (6, *spec.input_shape))
    else:
        x = rng.normal(size=(6, *spec.input_shape)).astype(np.float32)
    model = build_model(name, spec, 0, private=True)
    start = [p.detach().clone() for p in model.parameters()]
    private = PrivateTraining(1.0, 1.0)
    train_supervised(model, x, rng.integers(0, spec.num_classes, 6), epochs=1, batch_size=3,
                     optim=Optim(0.01), device=CPU, seed=0, dp=private)
    assert private.spent == [Spend(1.0, 0.5, 2)]
    assert all(not torch.equal(a, b) for a, b in zip(start, model.parameters()) if b.requires_grad)


def test_stage2_spends_only_on_its_private_term():
    """Stage 2 under DP: with a private term, one Poisson-sampled step per reference batch
    at the planned rate; without one it reads no private row, spends nothing and trains
    exactly as without DP."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    x_ref, targets = rng.normal(size=(50, 64)).astype(np.float32), rng.dirichlet(np.ones(10), 50)
    base = build_model("mlp", ModelSpec((64,), 10, 0, 1), 0)
    common = {"epochs": 2, "batch_size": 16, "optim": Optim(0.05), "device": CPU, "seed": 1,
              "temperature": 3.0, "kl_weight": 1.0, "private": (x, y), "max_grad_norm": 5.0}
    private = PrivateTraining(1.0, 1.0)
    distill(copy.deepcopy(base), x_ref, targets, private_weight=1.0, dp=private, private_rate=0.3, **common)
    assert private.spent == [Spend(1.0, 0.3, 2 * 4)]  # ceil(50 / 16) = 4 batches per epoch
    plain, public_only, unused = copy.deepcopy(base), copy.deepcopy(base), PrivateTraining(1.0, 1.0)
    distill(plain, x_ref, targets, private_weight=0.0, **common)
    distill(public_only, x_ref, targets, private_weight=0.0, dp=unused, **common)
    assert unused.spent == []
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), public_only.parameters()))


def test_models_opacus_cannot_train_are_converted_or_refused():
    resnet = build_model("resnet18", ModelSpec((3, 32, 32), 10, 0, 1), 0, private=True)
    kinds = {type(m).__name__ for m in resnet.modules()}
    assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds

    class Scale(nn.Module):  # a trainable layer with a buffer: its state would not be private
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
            return x * self.weight

    with pytest.raises(ValueError, match="model 'scaled' cannot be trained with DP-SGD"):
        private_compatible(nn.Sequential(nn.Linear(3, 3), Scale()), "scaled")


@pytest.mark.parametrize("values, key", [
    ({"dp-epsilon": 3.0, "dp-noise": 1.0}, "dp-noise"),
    ({"dp-epsilon": 3.0, "dp-delta": 1.0}, "dp-delta"),
    ({"dp-epsilon": 3.0, "dp-clip": 0.0}, "dp-clip"),
    ({"dp-epsilon": -1.0}, "dp-epsilon"),
    ({"dp-noise": 1.0, "strategy": "fedkd"}, "dp-epsilon'/'dp-noise"),
    ({"logit-noise": 1.0, "strategy": "fedavg"}, "logit-noise"),
    ({"dp-noise": 1.0, "distill-label-mix": True}, "distill-label-mix"),
])
def test_bad_privacy_settings_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        parse_run_config(values)


@pytest.mark.parametrize("values, on", [
    ({}, True),  # "auto", the default
    ({"dp-epsilon": 3.0}, False),  # "auto" under DP-SGD: the weights read private labels
    ({"dp-noise": 1.0, "distill-label-mix": "auto"}, False),
    ({"distill-label-mix": False}, False),
    ({"distill-label-mix": True}, True),
    ({"strategy": "fedmd"}, True),  # every strategy that distils
    ({"strategy": "ktpfl"}, True),
    ({"strategy": "fedavg"}, False),  # "auto" where nothing distils: stock,
    ({"strategy": "fedavg-topk"}, False),  # compressed,
    ({"strategy": "ditto"}, False),  # personalization,
    ({"strategy": "local"}, False),  # and the market without exchange
])
def test_label_mix_is_on_by_default_and_off_under_dp_sgd(values, on):
    assert parse_run_config(values).label_mix is on


def test_label_mix_takes_a_bool_or_auto():
    with pytest.raises(ConfigError, match="'distill-label-mix' = 'yes' must be true, false or 'auto'"):
        parse_run_config({"distill-label-mix": "yes"})


def test_runs_saved_before_the_label_mix_ran_without_it():
    assert not parse_run_config(stored_run_config({"strategy": "kta"})).label_mix


def test_noisy_logits_clip_each_row_and_stay_within_the_servers_bound():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 30, size=(400, 10)).astype(np.float32)
    clean = noisy_logits(logits, 1e-9, 2.0, rng)
    assert np.allclose(np.linalg.norm(clean, axis=1), 2.0, rtol=1e-4)  # every row clipped to 2
    assert np.allclose(clean.mean(axis=1), 0.0, atol=1e-4)
    noisy = noisy_logits(logits, 0.5, 2.0, np.random.default_rng(1))
    std = logit_noise_std(0.5, 2.0, 400)
    assert std == 2 * 0.5 * 2.0 * 20
    assert float((noisy - clean).std()) == pytest.approx(std, rel=0.02)
    centred = noisy - noisy.mean(axis=1, keepdims=True)
    assert np.abs(centred).max() < noisy_logit_bound(0.5, 2.0, 400, MAX_CENTRED_LOGIT)
    assert noisy_logit_bound(0.0, 2.0, 400, MAX_CENTRED_LOGIT) == MAX_CENTRED_LOGIT
