"""The unlabeled transfer set (issue 42): its rows, its splits, the market's targets on it,
the wire's rows and bytes, and the client's use of it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client_app.app import train
from kta_flwr.client.node import Node
from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.factory import market_params
from kta_flwr.flower import protocol
from kta_flwr.flower.strategies.base import Consensus
from kta_flwr.flower.strategies.market import KnowledgeMarket
from kta_flwr.maths.market import cap_loudness, centre, global_consensus, run_market
from kta_flwr.maths.market_kernels import FAST
from kta_flwr.server.global_model import ServerModel
from kta_flwr.task.datasets import ArrayDataset, Source
from kta_flwr.task.splits import UNLABELED, load_client_data, load_splits, writers_of
from tests.conftest import FakeNode, FixedGrid, client_metrics, reply, train_round

C = 10
pytestmark = pytest.mark.usefixtures("server_identity")  # messages are made here


def test_transfer_windows_rotate_without_repeats_within_a_cycle():
    windows = [protocol.transfer_window(50, 12, seed=4, subset_id=s) for s in range(5)]
    cycle = np.concatenate(windows[:4])  # 50 // 12 windows: no row twice
    assert len(np.unique(cycle)) == 48
    assert set(np.concatenate(windows)) == set(range(50))  # every row before any repeats
    assert all(len(w) == 12 for w in windows)
    np.testing.assert_array_equal(windows[2], protocol.transfer_window(50, 12, seed=4, subset_id=2))
    assert not np.array_equal(windows[1], protocol.transfer_window(50, 12, seed=5, subset_id=1))
    # a stream apart from the reference subsets'
    assert not np.array_equal(windows[1], protocol.reference_subset(50, 12 / 50, 4, 1))
    assert len(protocol.transfer_window(50, 0, seed=4, subset_id=1)) == 0


def _digits(**changes: object) -> RunConfig:
    return parse_run_config({"reference-size": 100, "test-size": 100, "seed": 3,
                             **{k.replace("_", "-"): v for k, v in changes.items()}})


def test_the_pool_transfer_set_is_unlabeled_and_no_client_holds_it():
    plain = load_splits(_digits())
    carved = load_splits(_digits(transfer_source="pool", transfer_size=200))
    transfer = carved.transfer
    assert plain.transfer is None
    assert transfer.x.shape == (200,) + plain.train.x.shape[1:]
    assert (transfer.y == UNLABELED).all()  # no label of the transfer set is ever loaded
    # the reference and test sets are untouched; the pool gives up exactly the transfer rows
    assert carved.reference_fingerprint == plain.reference_fingerprint
    np.testing.assert_array_equal(carved.test.x, plain.test.x)
    assert len(carved.train.y) + 200 == len(plain.train.y)
    rows = {row.tobytes() for row in plain.train.x}
    clients = {row.tobytes() for row in carved.train.x}
    assert all(row.tobytes() in rows and row.tobytes() not in clients for row in transfer.x)


def test_a_transfer_file_is_read_as_model_inputs_and_a_bad_one_is_refused(tmp_path):
    inputs = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "inputs.npy", inputs)
    np.savez(tmp_path / "inputs.npz", x=inputs)
    for name in ("inputs.npy", "inputs.npz"):
        splits = load_splits(_digits(transfer_source="file", transfer_path=str(tmp_path / name), transfer_size=30,
                                    transfer_rows=10))
        assert splits.transfer.x.shape == (30, 1, 8, 8) and (splits.transfer.y == UNLABELED).all()
        assert {r.tobytes() for r in splits.transfer.x} <= {r.tobytes() for r in inputs}
    np.save(tmp_path / "wrong.npy", inputs[:, :, :4])
    for path, size, says in ((tmp_path / "wrong.npy", 30, "shape [1, 4, 8]"),
                             (tmp_path / "missing.npy", 30, "no such file"),
                             (tmp_path / "inputs.npy", 41, "exceeds the 40 inputs")):
        with pytest.raises(ConfigError, match="transfer") as err:
            load_splits(_digits(transfer_source="file", transfer_path=str(path), transfer_size=size,
                                transfer_rows=10))
        assert says in str(err.value)


def test_emnist_letters_become_femnist_transfer_rows_dark_on_light(shared_datasets):
    cfg = parse_run_config({"dataset": "femnist", "data-path": str(shared_datasets / "femnist"),
                            "partitioner": "natural", "reference-size": 300, "test-size": 0,
                            "models": "femnist_cnn", "transfer-source": "emnist", "transfer-size": 500,
                            "transfer-path": str(shared_datasets / "emnist_letters")})
    splits = load_splits(cfg)
    transfer = splits.transfer.x
    assert transfer.shape == (500, 1, 28, 28) and (splits.transfer.y == UNLABELED).all()
    # FEMNIST writes dark strokes on a light page, EMNIST the other way round: inverted
    assert transfer[:, :, 0, :].mean() > 0.9 and splits.reference.x[:, :, 0, :].mean() > 0.9


def test_another_femnist_sample_gives_transfer_rows_of_writers_the_task_never_sees(shared_datasets):
    task, other = (shared_datasets / "femnist" / f"femnist_leaf_niid05_{name}.npz" for name in ("wenzhu", "arakotom"))
    with np.load(task) as mine, np.load(other) as theirs:
        kept = ~np.isin(theirs["writer_train"], mine["writer_train"])  # the task's test writers are among them
        expected = {row.tobytes() for row in (theirs["x_train"][kept][:, None] / np.float32(255)).astype(np.float32)}
    rows = int(kept.sum())
    assert 0 < rows < len(kept)  # the two samples share writers, and those are left out

    def femnist(size: int) -> RunConfig:
        return parse_run_config({"dataset": "femnist", "data-path": str(task), "partitioner": "natural",
                                 "reference-size": 300, "test-size": 0, "models": "femnist_cnn",
                                 "transfer-source": "femnist", "transfer-path": str(other),
                                 "transfer-size": size, "transfer-rows": 10})

    splits = load_splits(femnist(rows))
    assert (splits.transfer.y == UNLABELED).all()
    assert {row.tobytes() for row in splits.transfer.x} == expected
    assert len(splits.train.y) == len(load_splits(femnist(rows).replace(transfer_source="", transfer_path="")).train.y)
    with pytest.raises(ConfigError, match=f"'transfer-size' = {rows + 1} exceeds the {rows} inputs"):
        load_splits(femnist(rows + 1))


def test_the_writers_of_a_dataset_without_ids_on_its_test_split_are_its_training_writers():
    train = ArrayDataset(np.zeros((4, 1, 2, 2), np.float32), np.arange(4), 4)
    groups = np.array(["w2", "w1", "w2", "w3"])
    np.testing.assert_array_equal(writers_of(Source(train, None, groups, None)), ["w1", "w2", "w3"])
    np.testing.assert_array_equal(writers_of(Source(train, train, groups, np.array(["w4"] * 4))),
                                  ["w1", "w2", "w3", "w4"])
    assert writers_of(Source(train)) is None


@pytest.mark.parametrize(("changes", "named"), [
    ({"transfer-source": "web"}, "'transfer-source'"),
    ({"transfer-source": "emnist", "transfer-path": "e", "strategy": "fedavg"}, "'transfer-source'"),
    ({"transfer-source": "file", "transfer-path": "e", "strategy": "local"}, "'transfer-source'"),
    ({"transfer-source": "pool", "transfer-rows": 300, "transfer-size": 200}, "'transfer-rows'"),
    ({"transfer-source": "pool", "transfer-rows": -1}, "'transfer-rows'"),
    ({"transfer-source": "emnist"}, "'transfer-path'"),
    ({"transfer-source": "femnist"}, "'transfer-path'"),
    ({"transfer-source": "pool", "transfer-path": "x.npy"}, "'transfer-path'"),
    ({"transfer-source": "pool", "reference-ce-weight": 0.5}, "'reference-ce-weight'"),
])
def test_a_bad_transfer_config_is_refused_naming_the_key(changes, named):
    with pytest.raises(ConfigError, match=named):
        parse_run_config(changes)


def test_every_strategy_can_leave_the_pool_transfer_rows_out_of_its_clients_data():
    kta = load_splits(_digits(transfer_source="pool", transfer_size=200))
    fedrep = load_splits(_digits(transfer_source="pool", transfer_size=200, strategy="fedrep"))
    np.testing.assert_array_equal(kta.train.x, fedrep.train.x)  # the same pool, so the same partitions
    assert _digits(transfer_source="pool", strategy="fedrep").transfer_per_round == 0  # nothing exchanged
    for partition in range(3):
        mine = load_client_data(_digits(transfer_source="pool", transfer_size=200, strategy="fedrep"), partition, 3)
        np.testing.assert_array_equal(
            mine.train.x, load_client_data(_digits(transfer_source="pool", transfer_size=200), partition, 3).train.x)


def test_a_pool_too_small_for_the_transfer_set_is_refused():
    with pytest.raises(ConfigError, match="'transfer-size' = 1600 leaves no training data"):
        load_splits(_digits(transfer_source="pool", transfer_size=1600))


def _logits(rng: np.random.Generator, clients: int, rows: int) -> np.ndarray:
    return (rng.normal(size=(clients, rows, C)) * 2).astype(np.float32)


def test_transfer_rows_get_targets_by_the_round_weights_and_change_nothing_else():
    rng = np.random.default_rng(1)
    labels = np.tile(np.arange(C), 6)
    labeled, unlabeled = _logits(rng, 5, len(labels)), _logits(rng, 5, 17)
    held_out = np.zeros(len(labels), bool)
    held_out[::5] = True
    params = market_params(RunConfig(strategy="kta"))
    without = run_market(labeled, labels, params, held_out=held_out, target_rows=~held_out)
    out = run_market(labeled, labels, params, held_out=held_out, target_rows=~held_out, unlabeled=unlabeled)
    for field in ("accuracy", "divergence", "weights", "tau", "distill", "priors"):
        np.testing.assert_array_equal(getattr(out, field), getattr(without, field))
    kept = int((~held_out).sum())
    assert out.targets.shape == (5, kept + 17, C)
    np.testing.assert_array_equal(out.targets[:, :kept], without.targets)
    expected = FAST.targets(cap_loudness(centre(unlabeled), params.loudness_cap), out.weights,
                            temperature=params.temperature, space=params.target_space, priors=out.priors)
    np.testing.assert_allclose(out.targets[:, kept:], expected, rtol=1e-5, atol=1e-6)
    # each transfer row's target follows from that row alone
    order = rng.permutation(17)
    shuffled = run_market(labeled, labels, params, held_out=held_out, target_rows=~held_out,
                          unlabeled=unlabeled[:, order])
    np.testing.assert_allclose(shuffled.targets[:, kept:], out.targets[:, kept:][:, order], rtol=1e-5, atol=1e-7)


def _market(**changes: object) -> KnowledgeMarket:
    # no gate: on these random uploads whether a mix beats a client's own is chance
    cfg = RunConfig(strategy="kta", distill_gate=False)
    return KnowledgeMarket(**{
        "params": market_params(cfg), "reference_labels": np.tile(np.arange(C), 10), "num_classes": C,
        "fingerprint": "abc", "evaluate_metrics_aggr_fn": lambda recs, key: MetricRecord({}),
        "holdout_fraction": cfg.holdout_fraction, "reference_fraction": 0.5, "min_nodes": 3,
        "transfer_size": 45, "transfer_rows": 20, **changes})


def test_the_market_exchanges_reference_then_transfer_rows_with_exact_bytes():
    market = _market()
    rng = np.random.default_rng(2)
    grid = FixedGrid([10, 11, 12])
    ref_rows = len(market.rows(2))  # 50 of the 100 reference rows
    assert ref_rows == 50 and len(market.transfer(2)) == 20
    replies = [reply(n, RecordDict({
        protocol.LOGITS: protocol.pack(rng.normal(size=(ref_rows + 20, C)).astype(np.float32), market.codec),
        protocol.METRICS: client_metrics(i)})) for i, n in enumerate(grid.node_ids)]
    short = reply(13, RecordDict({  # the reference rows alone: the wrong shape, dropped
        protocol.LOGITS: protocol.pack(rng.normal(size=(ref_rows, C)).astype(np.float32), market.codec),
        protocol.METRICS: client_metrics(3)}))
    train_round(market, 1, replies + [short])
    assert sorted(market.bank) == [10, 11, 12]
    held = int(protocol.held_out_mask(100, market.holdout_fraction, market.last_draw)[market.rows(2)].sum())
    messages = list(market.configure_train(2, None, ConfigRecord({}), grid))
    carrying = [m for m in messages if protocol.TARGETS in m.content.array_records]
    assert carrying and len(carrying) == int(market.last_market.distill.sum())
    for message in carrying:
        targets = message.content.array_records[protocol.TARGETS][protocol.VALUES].numpy()
        assert targets.shape == (ref_rows - held + 20, C)
        assert targets.nbytes == market.codec.row_bytes(C) * (ref_rows - held + 20)
    record = market.round_record
    assert list(record["bytes_up"]) == [market.codec.row_bytes(C) * (ref_rows + 20)] * 3


def test_without_a_transfer_set_the_market_is_as_before():
    rng = np.random.default_rng(3)
    logits = [rng.normal(size=(50, C)).astype(np.float32) for _ in range(3)]
    outs = []
    for market in (_market(transfer_size=0, transfer_rows=0), _market(transfer_size=0, transfer_rows=20)):
        train_round(market, 1, [reply(n, RecordDict({
            protocol.LOGITS: protocol.pack(z, market.codec), protocol.METRICS: client_metrics(i)}))
            for i, (n, z) in enumerate(zip((10, 11, 12), logits))])
        outs.append(market.targets)
    for node in outs[0]:
        np.testing.assert_array_equal(outs[0][node], outs[1][node])


def test_a_client_uploads_and_distils_on_its_transfer_rows(tmp_path):
    node = FakeNode(tmp_path, "kta", reference_fraction=0.5, transfer_source="pool", transfer_size=200,
                    transfer_rows=30, local_epochs=1, distill_epochs=1)
    splits = load_splits(node.cfg)
    first = node.call("train", 1)
    assert not first.has_error(), first.error
    uploaded = first.content.array_records[protocol.LOGITS][protocol.VALUES].numpy()
    assert uploaded.shape == (50 + 30, C)
    # round 2 carries targets on the subset's rows not held out, then the transfer rows
    msg = node.message("train", 2)
    rows = protocol.reference_subset(100, 0.5, node.cfg.seed, 2)
    draw = 12345
    kept = len(protocol.distill_rows(rows, protocol.held_out_mask(100, node.cfg.holdout, draw)))
    targets = np.full((kept + 30, C), 1.0 / C, np.float32)
    msg.content[protocol.TARGETS] = protocol.pack(targets, key=protocol.TARGETS)
    msg.content[protocol.CONFIG] = ConfigRecord({"server-round": 2, protocol.TARGETS_SUBSET: 2,
                                                 protocol.LOGITS_SUBSET: 3, protocol.TARGETS_HOLDOUT: draw})
    second = train(msg, node.context)
    assert not second.has_error(), second.error
    assert "distill-loss" in second.content.metric_records[protocol.METRICS]
    assert splits.transfer is not None and len(splits.transfer.y) == 200
    # targets that leave the transfer rows out are refused, naming the record
    msg.content[protocol.TARGETS] = protocol.pack(targets[:kept], key=protocol.TARGETS)
    with pytest.raises(protocol.InvalidPayload, match="'targets'.*expected"):
        train(msg, node.context)


def test_transfer_rows_widen_the_privacy_plan_of_stage_2():
    from kta_flwr.client.privacy import stage2_steps  # pylint: disable=import-outside-toplevel

    cfg = dataclasses.replace(_digits(reference_fraction=0.5), batch_size=10)
    with_transfer = _digits(reference_fraction=0.5, transfer_source="pool", transfer_rows=30, batch_size=10)
    assert stage2_steps(with_transfer, 100) == stage2_steps(cfg, 100) + 3


def test_stage_2_shifts_its_images_when_asked(tmp_path):
    trained = {}
    for augment in (False, True):
        node = FakeNode(tmp_path / str(augment), "kta", distill_epochs=1, distill_augment=augment)
        # pylint: disable-next=protected-access
        assert (Node(node.message("train", 1), node.context)._distill_augment() is not None) == augment
        msg = node.message("train", 1)
        kept = len(protocol.distill_rows(np.arange(100), protocol.held_out_mask(100, node.cfg.holdout, 7)))
        msg.content[protocol.TARGETS] = protocol.pack(np.full((kept, C), 1.0 / C, np.float32), key=protocol.TARGETS)
        msg.content[protocol.CONFIG] = ConfigRecord({"server-round": 1, protocol.TARGETS_HOLDOUT: 7})
        assert not train(msg, node.context).has_error()
        trained[augment] = node.personal()
    assert any(not np.allclose(trained[False][k], trained[True][k]) for k in trained[False])


def transfer_consensus(labeled: np.ndarray, labels: np.ndarray, unlabeled: np.ndarray, params, *extra) -> np.ndarray:
    """The consensus on the transfer rows alone (after the labeled rows), checking that
    the labeled rows' part is the consensus without them."""
    both = global_consensus(labeled, labels, params, *extra, unlabeled=unlabeled)
    np.testing.assert_array_equal(both[:len(labels)], global_consensus(labeled, labels, params, *extra))
    return both[len(labels):]


def test_the_transfer_consensus_weighs_clients_by_their_information_on_the_labeled_rows():
    rng = np.random.default_rng(5)
    labels = np.tile(np.arange(C), 8)
    knows = np.eye(C, dtype=np.float32)[labels] * 6.0  # right and sure on every labeled row
    labeled = np.stack([knows, np.zeros_like(knows), np.zeros_like(knows)])  # two say nothing
    unlabeled = _logits(rng, 3, 25)
    params = dataclasses.replace(market_params(RunConfig(strategy="kta")), loudness_cap=0.0)
    out = transfer_consensus(labeled, labels, unlabeled, params)
    assert out.shape == (25, C)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out.argmax(axis=1), unlabeled[0].argmax(axis=1))
    louder = unlabeled.copy()
    louder[1:] = _logits(rng, 2, 25) * 5  # the uninformed clients weigh nothing, however loud
    np.testing.assert_allclose(transfer_consensus(labeled, labels, louder, params), out, rtol=1e-6)
    nobody = transfer_consensus(-np.stack([knows] * 3), labels, unlabeled, params)  # all wrong
    np.testing.assert_allclose(nobody, 1.0 / C, rtol=1e-6)  # no client informs: uniform rows


def test_the_market_hands_over_a_consensus_on_the_transfer_rows_too():
    market = _market(consensus=True)
    rng = np.random.default_rng(6)
    ref_rows = len(market.rows(2))
    train_round(market, 1, [reply(n, RecordDict({
        protocol.LOGITS: protocol.pack(rng.normal(size=(ref_rows + 20, C)).astype(np.float32), market.codec),
        protocol.METRICS: client_metrics(i)})) for i, n in enumerate((10, 11, 12))])
    taken = market.take_consensus()
    np.testing.assert_array_equal(taken.transfer_rows, market.transfer(2))
    stacked = np.stack([market.bank[n] for n in market.market_nodes])
    np.testing.assert_array_equal(taken.transfer_targets, transfer_consensus(
        stacked[:, :ref_rows], market.reference_labels[market.rows(2)], stacked[:, ref_rows:], market.params,
        market.last_market.divergence, market.last_market.priors))


def test_the_server_model_learns_on_the_transfer_rows_it_was_given_a_consensus_for():
    for teacher in ("consensus", "labels"):
        cfg = _digits(transfer_source="pool", transfer_size=200, transfer_rows=40, server_model="mlp",
                      server_model_teacher=teacher, server_model_epochs=1)
        splits = load_splits(cfg)
        model = ServerModel(cfg, splits, torch.device("cpu"))
        assert len(model.public.y) == 100 + 200 and (model.public.y[100:] == UNLABELED).all()
        rows, window = np.arange(0, 100, 2), protocol.transfer_window(200, 40, cfg.seed, 2)
        uniform = np.full((len(window), C), 1.0 / C, np.float32)
        loss = model.learn(1, Consensus(rows, np.eye(C, dtype=np.float32)[splits.reference.y[rows]], window, uniform))
        assert np.isfinite(loss) and loss > 0
        banked = np.flatnonzero(~np.isnan(model.targets[:, 0]))
        expected = rows if teacher == "labels" else np.concatenate([rows, 100 + window])
        np.testing.assert_array_equal(banked, np.sort(expected))


def test_the_server_model_as_one_more_teacher_mixes_into_every_pending_target():
    market = _market()
    rng = np.random.default_rng(7)
    ref_rows = len(market.rows(2))
    train_round(market, 1, [reply(n, RecordDict({
        protocol.LOGITS: protocol.pack(rng.normal(size=(ref_rows + 20, C)).astype(np.float32), market.codec),
        protocol.METRICS: client_metrics(i)})) for i, n in enumerate((10, 11, 12))])
    before = {node: q.copy() for node, q in market.targets.items()}
    assert before
    asked = []

    def predict(rows: np.ndarray, transfer_rows: np.ndarray) -> np.ndarray:
        asked.append((rows, transfer_rows))
        return np.eye(C, dtype=np.float32)[np.arange(len(rows) + len(transfer_rows)) % C]

    market.blend_teacher(predict, 0.25)
    (rows, transfer_rows), = asked
    held_out = protocol.held_out_mask(100, market.holdout_fraction, market.last_draw)
    np.testing.assert_array_equal(rows, protocol.distill_rows(market.rows(2), held_out))
    np.testing.assert_array_equal(transfer_rows, market.transfer(2))
    teacher = np.eye(C, dtype=np.float32)[np.arange(len(rows) + len(transfer_rows)) % C]
    for node, q in before.items():
        np.testing.assert_allclose(market.targets[node], 0.75 * q + 0.25 * teacher, rtol=1e-6, atol=1e-7)
    market.blend_teacher(predict, 0.0)  # off: nothing asked, nothing changed
    assert len(asked) == 1


def test_the_server_model_predicts_on_reference_then_transfer_rows():
    cfg = _digits(transfer_source="pool", transfer_size=200, transfer_rows=40, server_model="mlp",
                  server_model_teacher_weight=0.3)
    model = ServerModel(cfg, load_splits(cfg), torch.device("cpu"))
    probs = model.predict(np.array([3, 1, 4]), np.array([0, 199]))
    assert probs.shape == (5, C) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[1], model.predict(np.array([1]), np.arange(0))[0], rtol=1e-5)
    with pytest.raises(ConfigError, match="'server-model-teacher-weight'"):
        _digits(server_model_teacher_weight=0.3)
    with pytest.raises(ConfigError, match="'server-model-teacher-weight'"):
        _digits(server_model="mlp", server_model_teacher_weight=1.0)
