"""The personalization baselines (fedavg-ft, Ditto, FedRep) through the real ClientApp
functions, on digits: what crosses the wire and their published limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kta_flwr.client.node import Node
from kta_flwr.client.personal import with_received
from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.flower import protocol
from kta_flwr.task.models import build_model, head_keys
from kta_flwr.task.splits import load_splits
from tests.conftest import NODE_BASE as BASE
from tests.conftest import FakeNode


def _global_state(cfg: RunConfig, seed: int = 3) -> dict[str, torch.Tensor]:
    return build_model("mlp", load_splits(cfg).spec_for(cfg), seed).state_dict()


def _distance(a: dict[str, np.ndarray], b: dict[str, torch.Tensor]) -> float:
    return float(np.sqrt(sum(((a[k] - b[k].numpy()) ** 2).sum() for k in a)))


def test_fedrep_sends_exactly_the_body_and_keeps_its_head(tmp_path, server_identity):
    node = FakeNode(tmp_path, "fedrep", head_epochs=2)
    state = _global_state(node.cfg)
    head = head_keys(build_model("mlp", load_splits(node.cfg).spec_for(node.cfg), 0))
    body = {k: v for k, v in state.items() if k not in head}
    assert head == {"5.weight", "5.bias"}  # the mlp's last Linear (Flatten, Linear, ReLU, Linear, ReLU, Linear)
    reply = node.call("train", 1, body)
    sent = reply.content.array_records["arrays"]
    assert list(sent.keys()) == list(body)
    assert sum(a.numpy().nbytes for a in sent.values()) == sum(v.numpy().nbytes for v in body.values())
    assert not np.array_equal(sent["1.weight"].numpy(), body["1.weight"].numpy())  # the body trained
    kept = node.personal()
    assert set(kept) == set(state)  # body and head on the node
    # The model the node evaluates (and trains next): the server's body, its own head.
    msg = node.message("evaluate", 1, body)
    model = with_received(Node(msg, node.context), msg.content).state_dict()
    for key, value in model.items():
        want = torch.from_numpy(kept[key]) if key in head else body[key]
        assert torch.equal(value, want), key
    with pytest.raises(ConfigError, match="shares"):  # a whole model is not a body
        node.call("train", 3, state)


def test_fedrep_heads_start_from_the_global_initialisation(tmp_path, server_identity):
    """As in the authors' code: before a node trains, its head is the global model's
    initial head, whatever its partition (not the partition's own initialisation)."""
    cfg = FakeNode(tmp_path / "any", "fedrep").cfg
    initial = build_model("mlp", load_splits(cfg).spec_for(cfg), cfg.seed).state_dict()
    head = head_keys(build_model("mlp", load_splits(cfg).spec_for(cfg), 0))
    body = {k: v for k, v in initial.items() if k not in head}
    for partition in (1, 2):
        node = FakeNode(tmp_path / str(partition), "fedrep", partition=partition)
        msg = node.message("evaluate", 1, body)
        model = with_received(Node(msg, node.context), msg.content).state_dict()
        for key in head:
            assert torch.equal(model[key], initial[key]), (partition, key)


def test_ditto_with_lambda_zero_is_local_training(tmp_path, server_identity):
    ditto = FakeNode(tmp_path, "ditto", ditto_lambda=0.0)
    local = FakeNode(tmp_path, "local")
    state = _global_state(ditto.cfg)
    for server_round in (1, 2):
        reply = ditto.call("train", server_round, state)
        local.call("train", server_round)
        state = reply.content.array_records["arrays"].to_torch_state_dict()
        for key, value in local.personal().items():
            np.testing.assert_array_equal(ditto.personal()[key], value)
    ditto_eval = ditto.call("evaluate", 2, state).content.metric_records[protocol.METRICS]
    local_eval = local.call("evaluate", 2).content.metric_records[protocol.METRICS]
    assert ditto_eval["personalized-accuracy"] == local_eval["personalized-accuracy"]


def test_ditto_with_a_large_lambda_approaches_the_global_model(tmp_path, server_identity):
    """A constructed case: the global model the node receives was trained on another
    partition from another initialisation; plain SGD steps as in Ditto's Algorithm 1.
    λ pulls the personal model onto it: with λ large it is the global model (FedAvg's)."""
    trainer = FakeNode(tmp_path, "fedavg", partition=2, local_epochs=3)
    received = trainer.call("train", 1, _global_state(trainer.cfg, seed=99))
    received = received.content.array_records["arrays"].to_torch_state_dict()
    distances = {}
    for lam in (0.0, 1.0, 10.0):
        node = FakeNode(tmp_path / str(lam), "ditto", ditto_lambda=lam, local_epochs=3, momentum=0.0)
        node.call("train", 1, received)
        distances[lam] = _distance(node.personal(), received)
    assert distances[0.0] > distances[1.0] > distances[10.0]
    assert distances[10.0] < 0.05 * distances[0.0]
    with pytest.raises(ConfigError, match="ditto-lambda"):  # SGD on the penalty would diverge
        parse_run_config({**BASE, "strategy": "ditto", "ditto-lambda": 40.0})


def test_fedavg_ft_with_zero_epochs_evaluates_as_fedavg(tmp_path, server_identity):
    fedavg = FakeNode(tmp_path, "fedavg")
    state = _global_state(fedavg.cfg)
    want = fedavg.call("evaluate", 1, state).content.metric_records[protocol.METRICS]
    keys = ("personalized-accuracy", "global-accuracy", "test-loss")
    still = FakeNode(tmp_path, "fedavg-ft", finetune_epochs=0)
    got = still.call("evaluate", 1, state).content.metric_records[protocol.METRICS]
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    tuned = FakeNode(tmp_path, "fedavg-ft", finetune_epochs=2)
    better = tuned.call("evaluate", 1, state).content.metric_records[protocol.METRICS]
    assert better["personalized-accuracy"] > want["personalized-accuracy"]  # it fine-tuned
    assert "personal-model" in tuned.context.state.array_records  # and kept the model


@pytest.mark.parametrize("strategy", ["fedavg-ft", "ditto", "fedrep"])
def test_personalization_refuses_mixed_architectures(strategy):
    with pytest.raises(ConfigError, match="gives the clients mlp, cnn, but strategy .* averages weights"):
        parse_run_config({"strategy": strategy, "models": "mlp,cnn"})
    with pytest.raises(ConfigError, match=r"'fleet' = 'tiers3' gives the clients cnn \(small\), mlp "
                                          r"\(medium\), resnet8 \(large\), but strategy"):
        parse_run_config({"strategy": strategy, "fleet": "tiers3"})
    with pytest.raises(ConfigError, match="ditto-lambda"):
        parse_run_config({"strategy": strategy, "ditto-lambda": -1.0})
