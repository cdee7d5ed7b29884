"""The market's server-side global model (``server-model``): the consensus it learns
toward, the strategy that hands it over, and the model that never sees a client's data."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client_app.app import train

from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.factory import market_params
from kta_flwr.flower import protocol
from kta_flwr.flower.round_log import read_rounds
from kta_flwr.flower.strategies.base import Consensus
from kta_flwr.flower.strategies.market import KnowledgeMarket
from kta_flwr.maths.market import MarketParams, centre, global_consensus, pairwise_divergence, probabilities
from kta_flwr.server.global_model import ServerModel
from kta_flwr.task.datasets import ArrayDataset
from kta_flwr.task.models import build_model
from kta_flwr.task.splits import load_splits
from kta_flwr.tools.federation import LocalFederation
from tests.conftest import FakeNode, FixedGrid, client_metrics, read_results, reply, train_round

pytestmark = pytest.mark.usefixtures("server_identity")  # messages are made here

C = 3
#: Rows of classes 0, 0, 1, 1, 2, 2.
LABELS = np.array([0, 0, 1, 1, 2, 2])
#: No loudness cap (it depends on the row's median teacher, so on who else is there) and
#: no prior correction (it moves a flipper's wrong rows to the classes it never predicts).
PLAIN = MarketParams(loudness_cap=0.0, temperature=1.0, prior_correction=False)


def _confident(labels: np.ndarray, scale: float = 6.0) -> np.ndarray:
    """``[N, C]`` logits that put ``scale`` on each row's label."""
    return scale * np.eye(C)[labels]


def _teachers() -> np.ndarray:
    """Teacher 0 knows classes 0 and 1 (a guess on class 2), teacher 1 knows class 2
    (a guess elsewhere), teacher 2 flips class 0 to 1 and knows the rest."""
    knows_01 = np.where((LABELS < 2)[:, None], _confident(LABELS), 0.0)
    knows_2 = np.where((LABELS == 2)[:, None], _confident(LABELS), 0.0)
    flips_0 = _confident(np.where(LABELS == 0, 1, LABELS))
    return np.stack([knows_01, knows_2, flips_0]).astype(np.float32)


def test_consensus_weighs_each_client_by_what_it_knows_of_the_rows_class():
    teachers = _teachers()
    out = global_consensus(teachers, LABELS, PLAIN)
    assert out.shape == (len(LABELS), C) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
    assert (out.argmax(axis=1) == LABELS).all()  # the flipper has no say on class 0
    corrected = global_consensus(teachers, LABELS, MarketParams())  # the defaults: right everywhere too
    assert (corrected.argmax(axis=1) == LABELS).all()
    without_flipper = global_consensus(teachers[:2], LABELS, PLAIN)
    class0 = LABELS == 0
    np.testing.assert_allclose(out[class0], without_flipper[class0], rtol=1e-6)
    # on class 2 the guessing teacher 0 weighs nothing: teacher 1 and the flipper decide
    only_informed = global_consensus(teachers[1:], LABELS, PLAIN)
    np.testing.assert_allclose(out[LABELS == 2], only_informed[LABELS == 2], rtol=1e-6)


def test_consensus_keeps_the_label_where_no_client_informs_on_a_class():
    teachers = _teachers()[:1]  # teacher 0 alone: nothing on class 2
    out = global_consensus(teachers, LABELS, PLAIN)
    np.testing.assert_array_equal(out[LABELS == 2], np.eye(C, dtype=np.float32)[[2, 2]])
    assert (out[LABELS < 2].argmax(axis=1) == LABELS[LABELS < 2]).all()


def test_consensus_counts_near_copies_once_and_caps_loudness():
    sure = _confident(LABELS)
    unsure = _confident(LABELS, 3.0) + _confident((LABELS + 1) % C, 2.0)  # right, leaning to the next class
    teachers = np.stack([sure, unsure]).astype(np.float32)
    copies = np.stack([sure, unsure, unsure]).astype(np.float32)  # the unsure teacher twice
    params = dataclasses.replace(PLAIN, sybil_divergence=1e-5)

    def divergence(logits: np.ndarray) -> np.ndarray:
        return pairwise_divergence(probabilities(centre(logits), 1.0), "js")

    once = global_consensus(teachers, LABELS, params, divergence(teachers))
    twice = global_consensus(copies, LABELS, params, divergence(copies))
    np.testing.assert_allclose(twice, once, rtol=1e-5, atol=1e-7)
    # without the shares the copies count twice: every row leans further their way
    assert not np.allclose(global_consensus(copies, LABELS, params), once, atol=1e-4)

    # a teacher 100x louder than the others on every row pulls no harder than the cap allows
    teachers = _teachers()
    loud = np.stack([teachers[0], teachers[0], 100.0 * teachers[0]])
    capped = global_consensus(loud, LABELS, dataclasses.replace(PLAIN, loudness_cap=2.0))
    uncapped = global_consensus(loud, LABELS, PLAIN)
    assert capped[LABELS < 2].max() < uncapped[LABELS < 2].max()
    bound = global_consensus(np.stack([teachers[0], teachers[0], 2.0 * teachers[0]]), LABELS,
                             dataclasses.replace(PLAIN, loudness_cap=2.0))
    np.testing.assert_allclose(capped, bound, rtol=1e-4, atol=1e-6)


def _market(consensus: bool, reference_fraction: float = 1.0) -> KnowledgeMarket:
    cfg = RunConfig(strategy="kta")
    return KnowledgeMarket(
        params=market_params(cfg), reference_labels=np.tile(np.arange(C), 10), num_classes=C,
        fingerprint="abc", evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({}),
        holdout_fraction=cfg.holdout_fraction, reference_fraction=reference_fraction, consensus=consensus,
    )


def test_the_market_hands_over_its_consensus_on_the_rounds_rows_once():
    rng = np.random.default_rng(0)
    for consensus in (False, True):
        market = _market(consensus, reference_fraction=0.5)
        rows = market.rows(2)
        replies = [reply(n, RecordDict({
            protocol.LOGITS: protocol.pack(rng.normal(size=(len(rows), C)).astype(np.float32), market.codec),
            protocol.METRICS: client_metrics(n)})) for n in (1, 2, 3)]
        train_round(market, 1, replies)
        taken = market.take_consensus()
        assert market.take_consensus() is None  # taken once
        if not consensus:
            assert taken is None
            continue
        assert isinstance(taken, Consensus)
        np.testing.assert_array_equal(taken.rows, rows)  # every row of the subset, scored ones too
        stacked = np.stack([market.bank[n] for n in market.market_nodes])
        np.testing.assert_array_equal(taken.targets, global_consensus(
            stacked, market.reference_labels[rows], market.params, market.last_market.divergence))


@pytest.fixture(scope="module")
def digits():
    cfg = RunConfig(reference_size=60, test_size=60, server_model="cnn", server_model_epochs=2)
    return cfg, load_splits(cfg)


def test_the_server_model_reads_public_rows_and_the_consensus_only(digits):
    cfg, splits = digits
    rng = np.random.default_rng(1)
    rows = np.arange(0, 60, 2)
    targets = rng.dirichlet(np.ones(10), size=len(rows)).astype(np.float32)
    # the same splits with every client's row (the training pool) made unreadable
    poisoned = dataclasses.replace(splits, train=ArrayDataset(
        np.full_like(splits.train.x, np.nan), np.zeros_like(splits.train.y), splits.num_classes))
    models = []
    for data in (splits, poisoned):
        model = ServerModel(cfg, data, torch.device("cpu"))
        assert model.learn(1, None) == 0.0  # nothing to learn from before a consensus
        loss = model.learn(1, Consensus(rows, targets))
        assert np.isfinite(loss) and loss > 0
        models.append(model)
    for name, value in models[0].tensors().items():
        np.testing.assert_array_equal(value, models[1].tensors()[name])
    assert 0.0 <= models[0].accuracy() <= 1.0

    # the labels baseline learns toward one-hot labels: another model from the same rows
    baseline = ServerModel(cfg.replace(server_model_teacher="labels"), splits, torch.device("cpu"))
    baseline.learn(1, Consensus(rows, targets))
    np.testing.assert_array_equal(baseline.targets[rows], np.eye(10)[splits.reference.y[rows]])
    assert any(not np.array_equal(value, models[0].tensors()[name])
               for name, value in baseline.tensors().items())

    # a resumed run continues from the saved weights and bank
    restored = ServerModel(cfg, splits, torch.device("cpu"))
    restored.load_state_dict(models[0].state_dict())
    assert restored.accuracy() == models[0].accuracy()
    np.testing.assert_array_equal(restored.targets, models[0].targets)
    with pytest.raises(ValueError, match="'mlp'"):
        restored.load_state_dict({**models[0].state_dict(), "architecture": "mlp"})


def test_the_server_model_trains_at_its_own_learning_rate_or_the_distillation_one(digits):
    cfg, splits = digits
    rows = np.arange(0, 60, 2)
    targets = np.random.default_rng(3).dirichlet(np.ones(10), size=len(rows)).astype(np.float32)

    def trained(**changes) -> dict[str, np.ndarray]:
        model = ServerModel(cfg.replace(**changes), splits, torch.device("cpu"))
        model.learn(1, Consensus(rows, targets))
        return model.tensors()

    inherited = trained(distill_learning_rate=0.02)  # server-model-learning-rate 0: distill's
    explicit = trained(distill_learning_rate=0.5, server_model_learning_rate=0.02)
    other = trained(distill_learning_rate=0.02, server_model_learning_rate=0.005)
    for name, value in inherited.items():
        np.testing.assert_array_equal(value, explicit[name])
    assert any(not np.array_equal(value, other[name]) for name, value in inherited.items())


@pytest.mark.parametrize(("changes", "named"), [
    ({"strategy": "fedavg", "server-model": "mlp"}, "strategy 'fedavg' has a global model of its own"),
    ({"strategy": "local", "server-model": "mlp"}, "strategy 'local' has none"),
    ({"server-model": "nosuch"}, "'server-model' = 'nosuch'"),
    ({"server-model": "textbag"}, "'server-model' names 'textbag'"),
    ({"server-model": "mlp", "server-model-teacher": "oracle"}, "'server-model-teacher'"),
    ({"server-model": "mlp", "server-model-epochs": -1}, "'server-model-epochs'"),
    ({"server-model": "mlp", "server-model-learning-rate": -0.01}, "'server-model-learning-rate' = -0.01"),
    ({"server-model": "mlp", "server-model-learning-rate": float("nan")}, "'server-model-learning-rate' = nan"),
])
def test_a_bad_server_model_config_is_refused_naming_the_key(changes, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        parse_run_config(changes)


def test_newcomers_wait_for_their_round_and_get_the_start_model_with_their_first_instruction():
    market = KnowledgeMarket(
        params=market_params(RunConfig(strategy="kta")), reference_labels=np.tile(np.arange(C), 10),
        num_classes=C, fingerprint="abc", evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({}),
        min_nodes=3, join_round={1: 3}, consensus=True,
    )
    grid = FixedGrid([10, 11, 12])  # node 11 holds partition 1, the newcomer
    start = ArrayRecord({"w": Array(np.ones((4, 5), np.float32))})
    market.offer_start_model(start)
    rng = np.random.default_rng(2)
    for server_round in range(1, 5):
        messages = list(market.configure_train(server_round, ArrayRecord(), ConfigRecord({}), grid))
        sampled = [m.metadata.dst_node_id for m in messages]
        assert sampled == ([10, 12] if server_round < 3 else [10, 11, 12])
        carrying = {m.metadata.dst_node_id: m.content.array_records[protocol.START_MODEL]
                    for m in messages if protocol.START_MODEL in m.content.array_records}
        assert list(carrying) == ([11] if server_round == 3 else [])  # its first instruction only
        if carrying:
            np.testing.assert_array_equal(carrying[11]["w"].numpy(), np.ones((4, 5), np.float32))
        evaluated = [m.metadata.dst_node_id for m in market.configure_evaluate(
            server_round, ArrayRecord(), ConfigRecord({}), grid)]
        assert evaluated == sampled
        train_round(market, server_round, [reply(n, RecordDict({
            protocol.LOGITS: protocol.pack(rng.normal(size=(30, C)).astype(np.float32), market.codec),
            protocol.METRICS: client_metrics(grid.node_ids.index(n))})) for n in sampled])


def test_a_newcomer_starts_from_the_model_its_first_instruction_carries(tmp_path):
    offered = build_model("mlp", load_splits(FakeNode(tmp_path, "kta").cfg).spec, seed=99)
    trained = {}
    for start in (None, offered):
        node = FakeNode(tmp_path / str(start is None), "kta", local_epochs=1, learning_rate=1e-9)
        msg = node.message("train", 1)
        if start is not None:
            msg.content[protocol.START_MODEL] = ArrayRecord(start.state_dict())
        reply_msg = train(msg, node.context)
        assert not reply_msg.has_error()
        trained[start is None] = node.context.state.array_records["personal-model"]
    # a step of 1e-9: the newcomer's model is the offered one, the other its own initialisation
    for name, value in offered.state_dict().items():
        np.testing.assert_allclose(trained[False][name].numpy(), value.numpy(), atol=1e-6)
        assert not np.allclose(trained[True][name].numpy(), value.numpy(), atol=1e-6)


@pytest.mark.parametrize(("changes", "named"), [
    ({"newcomer-fraction": 0.3}, "'newcomer-round' = 0 must be in [2,"),
    ({"newcomer-fraction": 1.0, "newcomer-round": 2}, "'newcomer-fraction' = 1.0"),
    ({"newcomer-start": "global"}, "needs a strategy that uploads predictions and 'server-model'"),
    ({"newcomer-start": "global", "server-model": "cnn"}, "but the clients train ['mlp']"),
    ({"strategy": "fedavg", "newcomer-start": "global"}, "parameter strategies"),
])
def test_a_bad_newcomer_config_is_refused_naming_the_key(changes, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_run_config(changes)


def test_the_newcomers_are_a_seeded_share_of_the_fleet():
    cfg = RunConfig(newcomer_fraction=0.3, newcomer_round=4)
    assert len(cfg.newcomers(10)) == 3 and cfg.newcomers(10) == cfg.newcomers(10)
    assert cfg.replace(seed=1).newcomers(10) != cfg.newcomers(10)
    assert cfg.join_rounds(10) == dict.fromkeys(sorted(cfg.newcomers(10)), 4)
    assert len(cfg.replace(newcomer_fraction=0.01).newcomers(3)) == 1  # at least one
    assert len(cfg.replace(newcomer_fraction=0.9).newcomers(3)) == 2  # never the whole fleet
    assert RunConfig().join_rounds(10) == {}


@pytest.mark.slow
def test_a_newcomer_joins_a_running_simulation_from_the_server_model(tmp_path, app_dir):
    """One client of three joins in round 2 and starts from the server's global model:
    not evaluated before, its start model counted once on the wire, its accuracy after
    1 and 2 rounds in the summary."""
    rounds, clients, n_ref = 3, 3, 100
    cfg = {"num-server-rounds": rounds, "reference-size": n_ref, "test-size": 200, "local-epochs": 1,
           "distill-epochs": 1, "tracking": "none", "output-dir": str(tmp_path / "out"),
           "model-dir": str(tmp_path / "models"), "server-model": "mlp", "server-model-epochs": 1,
           "newcomer-fraction": 0.3, "newcomer-round": 2, "newcomer-start": "global"}
    with LocalFederation(tmp_path, clients, simulation=True) as fed:
        proc = fed.submit(app_dir, cfg)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (res,) = read_results(tmp_path / "out")
    (newcomer,) = parse_run_config(cfg).newcomers(clients)
    assert res["summary"]["newcomers"]["partitions"] == [newcomer]
    assert [row["clients_evaluated"] for row in res["rounds"]] == [2, 3, 3]
    assert math.isnan(res["rounds"][0]["newcomer-accuracy"])
    after = res["summary"]["newcomers"]["personalized_after_rounds"]
    assert list(after) == ["1", "2"] and after["1"] == res["rounds"][1]["newcomer-accuracy"]
    # the start model: the server model's every tensor, once, in round 2's instructions
    model = build_model("mlp", load_splits(RunConfig(reference_size=n_ref, test_size=200)).spec, 0)
    manifest = res["summary"]["wire_manifest"]
    starts = {key: count for key, count in manifest.items() if " start-model." in key}
    assert len(starts) == len(model.state_dict()) and set(starts.values()) == {1}
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    targets = read_rounds(next((tmp_path / "out").glob("*/rounds")).parent)[1]["bytes_down"].sum()
    assert res["rounds"][1]["bytes_down"] == model_bytes + targets
    assert res["rounds"][2]["bytes_down"] < model_bytes  # targets only after that


def test_a_newcomer_sampled_late_gets_the_start_model_with_the_first_instruction_it_receives():
    def market_of(fraction: float) -> KnowledgeMarket:
        return KnowledgeMarket(
            params=market_params(RunConfig(strategy="kta")), reference_labels=np.tile(np.arange(C), 10),
            num_classes=C, fingerprint="abc", evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({}),
            min_nodes=4, join_round={1: 2}, fraction_train=fraction, seed=0,
        )

    market = market_of(0.25)
    grid = FixedGrid([10, 11, 12, 13])
    market.offer_start_model(ArrayRecord({"w": Array(np.ones(3, np.float32))}))
    to_newcomer = []
    for server_round in range(1, 13):
        for message in market.configure_train(server_round, ArrayRecord(), ConfigRecord({}), grid):
            if message.metadata.dst_node_id == 11:
                to_newcomer.append((server_round, protocol.START_MODEL in message.content.array_records))
        if server_round == 6:  # a resumed run remembers who was sent it
            restored = market_of(0.25)
            restored.load_state_dict(market.state_dict())
            assert restored.started == market.started
    assert len(to_newcomer) >= 2 and to_newcomer[0][0] > 2  # not sampled in the round it joined
    assert [carried for _, carried in to_newcomer] == [True] + [False] * (len(to_newcomer) - 1)
