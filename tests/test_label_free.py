"""The unlabeled mode (``reference-labels = none``, issue 42): teacher quality from the
others' consensus (kta_flwr.maths.label_free), each client scored on a reserve of rows it
is never sent targets on, the strategy without labels, and the copying attacker."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client_app.app import train
from kta_flwr.client.attacks import attackers
from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.factory import build_strategy, market_params, node_options
from kta_flwr.flower import protocol
from kta_flwr.flower.strategies.market import KnowledgeMarket
from kta_flwr.maths.label_free import agreement_information, leave_one_out_labels
from kta_flwr.maths.market import run_market, softmax
from tests.conftest import FakeNode, FixedGrid, client_metrics, reply, train_round

N, C = 400, 10


def _teacher(rng: np.random.Generator, labels: np.ndarray, accuracy: float) -> np.ndarray:
    """``[N, C]`` logits right on ``accuracy`` of the rows (logit 4 on its pick), noisy."""
    right = rng.random(len(labels)) < accuracy
    pick = np.where(right, labels, (labels + rng.integers(1, C, len(labels))) % C)
    return (4.0 * np.eye(C)[pick] + rng.normal(0, 0.5, (len(labels), C))).astype(np.float32)


def _with_a_copier(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Five clients' logits ``[5, N, C]`` and their reserves ``[5, N]``: a good teacher
    (90 % right), three fair ones (70 %), and a copier that uploads the honest clients'
    consensus, one-hot x 10, on every row but its reserve (where it was never sent any
    targets), and its own weak predictions (40 %) there."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N)
    honest = np.stack([_teacher(rng, labels, 0.9)] + [_teacher(rng, labels, 0.7) for _ in range(3)])
    reserves = np.zeros((5, N), bool)
    for row in reserves:
        row[rng.choice(N, N // 5, replace=False)] = True
    consensus = 10.0 * np.eye(C, dtype=np.float32)[honest.mean(axis=0).argmax(axis=1)]
    copier = np.where(reserves[4][:, None], _teacher(rng, labels, 0.4), consensus)
    return np.concatenate([honest, copier[None]]), reserves


def _kta(**changes) -> object:
    return replace(market_params(RunConfig()), **changes)


def test_a_copier_ranks_below_a_good_teacher_where_it_has_nothing_to_copy():
    logits, reserves = _with_a_copier()
    good, copier = 0, 4
    fair = [1, 2, 3]  # the students both teach
    scored = run_market(logits, None, _kta(), held_out=reserves[0], scored=reserves)
    assert (scored.weights[fair, good] > 3 * scored.weights[fair, copier]).all()
    assert scored.accuracy[good] > scored.accuracy[copier]
    # scored on every row, the copier's repetition of the consensus outranks everyone:
    # the reserve is what makes copying worthless
    everywhere = run_market(logits, None, _kta(), held_out=reserves[0], scored=np.ones_like(reserves))
    assert (everywhere.weights[fair, copier] > everywhere.weights[fair, good]).all()


def test_the_information_score_counts_only_each_teachers_scored_rows():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 50, C))
    pseudo = rng.integers(0, C, (3, 50))
    weights = rng.random((3, 50))
    scored = rng.random((3, 50)) < 0.3
    out = agreement_information(logits, pseudo, weights, scored)
    # changing a teacher's logits off its scored rows changes nothing
    changed = logits.copy()
    changed[~scored] = 100.0 * rng.normal(size=(int((~scored).sum()), C))
    np.testing.assert_allclose(agreement_information(changed, pseudo, weights, scored), out)
    # a teacher with no scored row is worth nothing
    scored[2] = False
    assert (agreement_information(logits, pseudo, weights, scored)[:, 2] == 0).all()


def test_pseudo_labels_leave_the_client_out_and_count_near_copies_once():
    votes = np.zeros((4, 1, 3))
    votes[0, 0, 0] = 3.0  # one client for class 0
    votes[1:, 0, 1] = 2.0  # three copies for class 1
    labels = leave_one_out_labels(votes, np.ones(4))
    assert labels[0, 0] == 1  # client 0 cannot vote for itself
    assert labels[1, 0] == 1  # each copy's two twins outvote client 0 (4 > 3)
    # with the copies counted once (share 1/3 each) they no longer do (4/3 < 3)
    shared = leave_one_out_labels(votes, np.array([1.0, 1 / 3, 1 / 3, 1 / 3]))
    assert shared[1, 0] == 0 and shared[0, 0] == 1


def test_the_unlabeled_market_ranks_teachers_as_the_labeled_one_does():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, C, N)
    accuracies = [0.9, 0.8, 0.7, 0.5, 0.3]
    logits = np.stack([_teacher(rng, labels, a) for a in accuracies])
    held_out = np.zeros(N, bool)
    held_out[: N // 5] = True
    unlabeled = run_market(logits, None, _kta(), held_out=held_out)
    labeled = run_market(logits, labels, _kta(), held_out=held_out)
    assert list(np.argsort(-unlabeled.accuracy)) == list(np.argsort(-labeled.accuracy)) == [0, 1, 2, 3, 4]
    assert unlabeled.targets.shape == labeled.targets.shape


def _unlabeled_market(**changes: object) -> KnowledgeMarket:
    cfg = RunConfig(strategy="kta", reference_labels="none")
    return KnowledgeMarket(**{
        "params": market_params(cfg), "reference_labels": None, "num_reference": 100, "num_classes": C,
        "fingerprint": "abc", "evaluate_metrics_aggr_fn": lambda recs, key: MetricRecord({}),
        "holdout_fraction": cfg.holdout_fraction, "min_nodes": 3, **changes})


def _round(market: KnowledgeMarket, uploads: list[np.ndarray]) -> None:
    train_round(market, 1, [reply(node, RecordDict({
        protocol.LOGITS: protocol.pack(z, market.codec), protocol.METRICS: client_metrics(i)}))
        for i, (node, z) in enumerate(zip((10, 11, 12), uploads))])


@pytest.mark.usefixtures("server_identity")
def test_the_server_holds_no_label_and_gives_each_client_its_own_upload_on_its_reserve():
    cfg = parse_run_config({"strategy": "kta", "reference-labels": "none"})
    assert not cfg.labeled_reference and parse_run_config({"strategy": "kta"}).labeled_reference
    built = build_strategy(cfg, initial_arrays=ArrayRecord(), reference_labels=np.arange(100) % C,
                           num_classes=C, fingerprint="abc",
                           options=node_options(cfg, lambda recs, key: MetricRecord({}), None))
    assert built.reference_labels is None and built.num_reference == 100
    rng = np.random.default_rng(4)
    uploads = [rng.normal(0, 2, (100, C)).astype(np.float32) for _ in range(3)]
    market = _unlabeled_market()
    market.partition_of = {10: 0, 11: 1, 12: 2}
    _round(market, uploads)
    held_out = protocol.held_out_mask(100, market.holdout_fraction, market.last_draw)
    reserves = [protocol.reserve_mask(100, market.holdout_fraction, market.reserve_draw, p) for p in range(3)]
    assert market.reserve_draw == market.last_draw  # the first market round's draw: no client can compute it
    assert not np.array_equal(reserves[0], reserves[1])
    messages = {m.metadata.dst_node_id: m for m in market.configure_train(2, None, ConfigRecord({}),
                                                                         FixedGrid([10, 11, 12]))}
    for partition, node in enumerate((10, 11, 12)):
        if node not in market.targets:
            continue
        sent = messages[node].content.array_records[protocol.TARGETS][protocol.VALUES].numpy()
        assert sent.shape == (int((~held_out).sum()), C)  # the bytes of the labeled market
        reserved = reserves[partition][~held_out]
        own = softmax(uploads[partition] - uploads[partition].mean(axis=1, keepdims=True),
                      market.params.temperature)[~held_out]
        np.testing.assert_allclose(sent[reserved], own[reserved], rtol=1e-5, atol=1e-6)
        assert not np.allclose(sent[~reserved], own[~reserved], atol=1e-3)
    # other uploads, the same config: other reserves (they follow from the uploads)
    again = _unlabeled_market()
    again.partition_of = market.partition_of
    _round(again, [z + 0.01 for z in uploads])
    assert again.reserve_draw != market.reserve_draw
    # the reserve survives a restart of the server
    restored = _unlabeled_market()
    restored.load_state_dict(market.state_dict())
    assert restored.reserve_draw == market.reserve_draw


@pytest.mark.usefixtures("server_identity")
def test_fedmd_runs_without_labels_and_a_consensus_needs_them():
    """FedMD, the other market strategy the mode allows: the plain mean of the uploads for
    everyone, no label held; the server's consensus (server-model) is refused."""
    cfg = RunConfig(strategy="fedmd", reference_labels="none")
    market = _unlabeled_market(params=market_params(cfg), holdout_fraction=cfg.holdout)
    rng = np.random.default_rng(6)
    uploads = [rng.normal(0, 2, (100, C)).astype(np.float32) for _ in range(3)]
    _round(market, uploads)
    assert sorted(market.targets) == [10, 11, 12]
    mean = softmax(np.mean([z - z.mean(axis=1, keepdims=True) for z in uploads], axis=0),
                   market.params.temperature)
    for targets in market.targets.values():
        np.testing.assert_allclose(targets, mean, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no consensus"):
        _unlabeled_market(consensus=True)


@pytest.mark.parametrize(("changes", "named"), [
    ({"strategy": "ktpfl"}, "'strategy' = 'ktpfl'"),
    ({"market": "fixed"}, "'market' = 'fixed'"),
    ({"holdout-fraction": 0.0}, "'holdout-fraction'"),
    ({"teacher-quality": "likelihood"}, "'teacher-quality'"),
    ({"class-quality": True}, "'class-quality'"),
    ({"reference-ce-weight": 0.5}, "'reference-ce-weight'"),
    ({"server-model": "mlp"}, "'server-model'"),
    ({"reference-labels": "hidden"}, "'reference-labels' = 'hidden' is not allowed"),
])
def test_what_needs_labels_is_refused_in_the_unlabeled_mode_naming_the_key(changes, named):
    with pytest.raises(ConfigError, match=named):
        parse_run_config({"reference-labels": "none", **changes})


@pytest.mark.usefixtures("server_identity")
def test_a_copying_client_uploads_the_top_class_of_the_targets_it_was_sent(tmp_path):
    cfg = RunConfig(attack="copy-targets", attack_fraction=0.5)
    partition = min(attackers(cfg, 4))
    node = FakeNode(tmp_path, "kta", partition=partition, attack="copy-targets", attack_fraction=0.5,
                    distill_epochs=1)
    first = node.call("train", 1)  # no targets yet: its honest logits
    assert not first.has_error(), first.error
    honest = first.content.array_records[protocol.LOGITS][protocol.VALUES].numpy()
    assert np.abs(honest).max() < node.cfg.attack_scale
    msg = node.message("train", 2)
    draw = 777
    held_out = protocol.held_out_mask(100, node.cfg.holdout, draw)
    targets = softmax(np.random.default_rng(5).normal(0, 2, (int((~held_out).sum()), C))).astype(np.float32)
    msg.content[protocol.TARGETS] = protocol.pack(targets, key=protocol.TARGETS)
    msg.content[protocol.CONFIG] = ConfigRecord({"server-round": 2, protocol.TARGETS_SUBSET: 2,
                                                 protocol.LOGITS_SUBSET: 3, protocol.TARGETS_HOLDOUT: draw})
    second = train(msg, node.context)
    assert not second.has_error(), second.error
    uploaded = second.content.array_records[protocol.LOGITS][protocol.VALUES].numpy()
    np.testing.assert_array_equal(uploaded[~held_out].argmax(axis=1), targets.argmax(axis=1))
    assert (uploaded[~held_out].max(axis=1) == node.cfg.attack_scale).all()
    assert np.abs(uploaded[held_out]).max() < node.cfg.attack_scale  # nothing sent there: its own
