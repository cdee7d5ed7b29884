"""What crosses the wire and how the market strategy treats good and bad replies."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from kta_flwr.flower import protocol
from kta_flwr.maths.knowledge_codec import Codec
from kta_flwr.config import RunConfig
from kta_flwr.flower.metering import payload_bytes
from kta_flwr.factory import market_params
from kta_flwr.flower.strategies.market import KnowledgeMarket
from client_app.app import train
from tests.conftest import FakeNode, FixedGrid, client_metrics, reply, train_round

N, C = 20, 4


pytestmark = pytest.mark.usefixtures("server_identity")


def logits_reply(node_id, values):
    return reply(node_id, RecordDict({protocol.LOGITS: ArrayRecord({protocol.VALUES: Array(values)}),
                                      protocol.METRICS: client_metrics(node_id)}))


def make_strategy(strategy="kta", holdout_fraction=0.0, options=None, **changes):
    """A market whose gate is off unless asked for: the random logits of these protocol
    tests would have it keep most targets back. ``options``: more constructor arguments."""
    rng = np.random.default_rng(0)
    cfg = RunConfig(strategy=strategy).replace(**{"distill_gate": False, **changes})
    return KnowledgeMarket(
        params=market_params(cfg),
        reference_labels=rng.integers(0, C, N), num_classes=C, fingerprint="abc",
        evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({"n": len(recs)}),
        holdout_fraction=holdout_fraction, **(options or {}),
    )


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (np.full((N, C), np.nan, np.float32), "NaN"),
        (np.zeros((N + 1, C), np.float32), "shape"),
        (np.zeros((N, C), np.int32), "dtype"),
        (np.zeros((N,), np.float32), "shape"),
    ],
)
def test_unpack_rejects_bad_logits(values, reason):
    content = RecordDict({protocol.LOGITS: ArrayRecord({protocol.VALUES: Array(values)})})
    with pytest.raises(protocol.InvalidPayload, match=reason):
        protocol.unpack(content, protocol.LOGITS, N, C)


def test_unpack_rejects_missing_and_extra_arrays():
    with pytest.raises(protocol.InvalidPayload, match="no 'logits'"):
        protocol.unpack(RecordDict(), protocol.LOGITS, N, C)
    two = ArrayRecord({"values": Array(np.zeros((N, C), np.float32)), "w": Array(np.zeros(3))})
    with pytest.raises(protocol.InvalidPayload, match="expects arrays"):
        protocol.unpack(RecordDict({protocol.LOGITS: two}), protocol.LOGITS, N, C)


def test_bad_clients_are_dropped_and_the_round_goes_on():
    strategy = make_strategy()
    rng = np.random.default_rng(1)
    good = [logits_reply(i, rng.normal(size=(N, C)).astype(np.float32)) for i in (1, 2, 3)]
    bad = [
        logits_reply(4, np.full((N, C), np.inf, np.float32)),
        logits_reply(5, np.zeros((N, C + 1), np.float32)),
        reply(6, RecordDict({protocol.METRICS: MetricRecord({"x": 1})})),
        reply(7, error="ClientApp crashed"),
    ]
    _, metrics = train_round(strategy, 1, good + bad)
    assert metrics["replies"] == 3 and metrics["dropped"] == 4
    assert sorted(strategy.bank) == [1, 2, 3] == sorted(strategy.targets)
    for targets in strategy.targets.values():
        assert targets.shape == (N, C)
        np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)


def test_instructions_carry_only_personal_targets():
    strategy = make_strategy()
    rng = np.random.default_rng(2)
    train_round(strategy, 1, [logits_reply(i, rng.normal(size=(N, C)).astype(np.float32)) for i in (1, 2)])
    messages = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord({}), FixedGrid([1, 2, 9])))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    assert sorted(by_node) == [1, 2, 9]
    for node in (1, 2):
        content = by_node[node].content
        sent = protocol.unpack(content, protocol.TARGETS, N, C)
        np.testing.assert_array_equal(sent, strategy.targets[node])
        assert payload_bytes(content) == N * C * 4  # exactly one [N, C] float32 array
        assert content[protocol.CONFIG]["server-round"] == 2
    assert payload_bytes(by_node[9].content) == 0  # a node the market has not priced yet
    assert not np.array_equal(strategy.targets[1], strategy.targets[2])


def test_local_strategy_exchanges_nothing():
    strategy = make_strategy("local")
    _, metrics = train_round(strategy, 1, [reply(1, RecordDict({protocol.METRICS: client_metrics(1)}))])
    assert metrics["replies"] == 1 and not strategy.targets
    messages = strategy.configure_train(2, ArrayRecord(), ConfigRecord({}), FixedGrid([1, 2]))
    assert all(payload_bytes(m.content) == 0 for m in messages)


def test_evaluation_only_every_k_rounds_and_in_the_last():
    strategy = make_strategy(options={"evaluate_every": 3, "last_round": 7})
    grid = FixedGrid([11, 12])
    asked = [r for r in range(1, 8)
             if list(strategy.configure_evaluate(r, ArrayRecord(), ConfigRecord(), grid))]
    assert asked == [3, 6, 7]


def test_compressed_knowledge_crosses_the_strategy():
    """int8 targets down and topk logits up: exact payload sizes, faithful decoding."""
    rng = np.random.default_rng(3)
    strategy = KnowledgeMarket(
        params=market_params(RunConfig(distill_gate=False)), reference_labels=rng.integers(0, C, N), num_classes=C,
        fingerprint="abc", evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({}),
        codec=Codec("int8"),
    )
    logits = {i: rng.normal(size=(N, C)).astype(np.float32) for i in (1, 2)}
    replies = [reply(i, RecordDict({protocol.LOGITS: protocol.pack(x, Codec("int8")),
                                    protocol.METRICS: client_metrics(i)}))
               for i, x in logits.items()]
    train_round(strategy, 1, replies)
    assert sorted(strategy.bank) == [1, 2]
    centred = logits[1] - logits[1].mean(axis=1, keepdims=True)
    assert np.abs(strategy.bank[1] - centred).max() <= np.abs(centred).max() / 254 + 1e-6
    messages = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), FixedGrid([1, 2])))
    content = messages[0].content
    assert payload_bytes(content) == N * (C + 4)
    sent = protocol.unpack(content, protocol.TARGETS, N, C, Codec("int8"))
    assert np.allclose(sent.sum(axis=1), 1) and np.abs(sent - strategy.targets[1]).max() < 0.01


def test_reference_subsets_rotate_over_the_whole_set():
    subsets = [protocol.reference_subset(N, 0.3, 7, i) for i in range(4)]
    assert all(len(s) == 6 and np.all(np.diff(s) > 0) for s in subsets)
    assert set(np.concatenate(subsets[:3])) | set(subsets[3]) == set(range(N))
    assert len(set(np.concatenate(subsets[:3]))) == 18  # no row repeats within a cycle
    np.testing.assert_array_equal(subsets[1], protocol.reference_subset(N, 0.3, 7, 1))
    np.testing.assert_array_equal(protocol.reference_subset(N, 1.0, 7, 5), np.arange(N))


def test_market_on_a_rotating_reference_subset():
    rng = np.random.default_rng(3)
    strategy = make_strategy(options={"reference_fraction": 0.5})
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), FixedGrid([1, 2, 3])))
    assert all(m.content.config_records[protocol.CONFIG][protocol.LOGITS_SUBSET] == 2 for m in msgs)
    half = N // 2
    replies = [logits_reply(i, rng.normal(size=(half, C)).astype(np.float32)) for i in (1, 2)]
    replies.append(logits_reply(3, rng.normal(size=(N, C)).astype(np.float32)))  # all rows: wrong
    _, metrics = train_round(strategy, 1, replies)
    assert metrics["dropped"] == 1 and sorted(strategy.targets) == [1, 2]
    assert strategy.targets[1].shape == (half, C) and strategy.target_subset[1] == 2
    # The market priced the rows of subset 2 against their own labels.
    rows = strategy.rows(2)
    np.testing.assert_allclose(
        strategy.last_market.accuracy,
        [(strategy.bank[n].argmax(1) == strategy.reference_labels[rows]).mean() for n in (1, 2)],
    )
    msgs = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(2, ArrayRecord(), ConfigRecord({}), FixedGrid([1, 3]))}
    assert msgs[1].content.config_records[protocol.CONFIG][protocol.TARGETS_SUBSET] == 2
    assert protocol.TARGETS not in msgs[3].content.array_records


def test_targets_skip_held_out_rows_and_the_gate_keeps_some_back():
    """Node 1 predicts the labels, nodes 2 and 3 guess: node 1 gets no targets (no
    teacher beats it on the held-out rows), the guessers get targets on the other rows,
    and their instruction names the draw of the rows the market held out."""
    strategy = make_strategy(holdout_fraction=0.25, distill_gate=True)
    rng = np.random.default_rng(4)
    expert = 5.0 * np.eye(C, dtype=np.float32)[strategy.reference_labels]
    guessers = [rng.normal(size=(N, C)).astype(np.float32) for _ in (2, 3)]
    _, metrics = train_round(strategy, 1, [logits_reply(i, x) for i, x in zip((1, 2, 3), [expert, *guessers])])
    assert metrics["distilling-clients"] == 2 and sorted(strategy.targets) == [2, 3]
    assert strategy.targets[2].shape == (N - N // 4, C)
    np.testing.assert_array_equal(strategy.targets[2], strategy.last_market.targets[1])
    msgs = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(2, ArrayRecord(), ConfigRecord({}), FixedGrid([1, 2, 3]))}
    assert payload_bytes(msgs[1].content) == 0
    assert payload_bytes(msgs[2].content) == (N - N // 4) * C * 4
    draw = msgs[2].content.config_records[protocol.CONFIG][protocol.TARGETS_HOLDOUT]
    assert draw == strategy.last_draw and protocol.TARGETS_HOLDOUT not in msgs[1].content.config_records[protocol.CONFIG]
    held_out = protocol.held_out_mask(N, 0.25, draw)
    rows = protocol.distill_rows(np.arange(N), held_out)
    assert held_out.sum() == N // 4 and len(rows) == N - N // 4 and not held_out[rows].any()


def test_the_scored_rows_change_every_round_and_follow_from_the_uploads_not_the_config():
    """The held-out rows are drawn after the uploads, from all of them: two rounds with
    the same run config hold out different rows, and one client's upload changed in one
    value changes the draw (so no client can compute it before uploading)."""
    rng = np.random.default_rng(5)
    uploads = [rng.normal(size=(N, C)).astype(np.float32) for _ in range(3)]
    masks, strategy = [], make_strategy(holdout_fraction=0.25)
    for server_round in (1, 2, 3):
        train_round(strategy, server_round, [logits_reply(i, x) for i, x in zip((1, 2, 3), uploads)])
        masks.append(protocol.held_out_mask(N, 0.25, strategy.last_draw))
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    other = make_strategy(holdout_fraction=0.25)
    changed = [uploads[0], uploads[1], uploads[2].copy()]
    changed[2][0, 0] = np.nextafter(changed[2][0, 0], np.float32(np.inf))
    train_round(other, 1, [logits_reply(i, x) for i, x in zip((1, 2, 3), changed)])
    assert not np.array_equal(protocol.held_out_mask(N, 0.25, other.last_draw), masks[0])
    # the same uploads give the same draw (a run replays and resumes bit for bit)
    again = make_strategy(holdout_fraction=0.25)
    train_round(again, 1, [logits_reply(i, x) for i, x in zip((1, 2, 3), uploads)])
    np.testing.assert_array_equal(protocol.held_out_mask(N, 0.25, again.last_draw), masks[0])


def test_a_draw_that_repeats_the_last_rounds_rows_is_drawn_again():
    uploads = np.random.default_rng(6).normal(size=(3, N, C)).astype(np.float32)
    first = protocol.scoring_draw(2, uploads, None, N, 0.25)
    # told that the previous round held out exactly these rows, it draws other rows
    again = protocol.scoring_draw(2, uploads, first, N, 0.25)
    assert not np.array_equal(protocol.held_out_mask(N, 0.25, again), protocol.held_out_mask(N, 0.25, first))


def test_cross_device_rounds_keep_the_bank_bounded():
    """1,000 nodes, 10 % sampled per round: the market prices the nodes banked within the
    staleness bound, and the bank never holds more than the last rounds' senders."""
    rng = np.random.default_rng(5)
    cfg = RunConfig(strategy="kta").replace(distill_gate=False)
    strategy = KnowledgeMarket(
        params=market_params(cfg), reference_labels=rng.integers(0, C, N), num_classes=C,
        fingerprint="abc", evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({}),
        fraction_train=0.1, max_staleness=2, min_nodes=1000,
    )
    grid = FixedGrid(list(range(1, 1001)))
    senders = []
    for rnd in range(1, 7):
        messages = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord({}), grid))
        sampled = [m.metadata.dst_node_id for m in messages]
        assert len(sampled) == 100
        senders.append(set(sampled))
        replies = [logits_reply(n, rng.normal(size=(N, C)).astype(np.float32)) for n in sampled]
        _, metrics = train_round(strategy, rnd, replies)
        recent = set().union(*senders[-3:])  # uploads of this round and the 2 before
        assert set(strategy.bank) == recent
        assert metrics["market-clients"] == len(recent) <= 300
        assert metrics["market-seconds"] >= 0.0
        assert set(strategy.targets) == recent


@pytest.mark.parametrize("strategy", ["kta", "fedmd", "ktpfl"])  # every strategy with a stage 2
def test_distill_label_mix_reaches_every_market_strategys_stage_2(tmp_path, strategy):
    """``distill-label-mix`` through the real ClientApp: the same targets (each row naming
    one class) give another stage-2 loss with the rows weighted by the client's label mix."""
    losses = {}
    for mixed in (False, True):
        node = FakeNode(tmp_path / str(mixed), strategy, distill_label_mix=mixed)
        held_out = protocol.held_out_mask(100, node.cfg.holdout, 12345)
        rows = 100 - int(held_out.sum())
        targets = np.full((rows, 10), 0.01, np.float32)
        targets[np.arange(rows), np.arange(rows) % 10] = 0.91
        msg = FakeNode.message("train", 2)
        msg.content[protocol.TARGETS] = protocol.pack(targets, key=protocol.TARGETS)
        msg.content[protocol.CONFIG] = ConfigRecord({"server-round": 2, protocol.TARGETS_SUBSET: 0,
                                                     protocol.TARGETS_HOLDOUT: 12345})
        answer = train(msg, node.context)
        assert not answer.has_error(), answer.error
        losses[mixed] = answer.content.metric_records["metrics"]["distill-loss"]
    assert losses[True] != pytest.approx(losses[False], rel=1e-3)


def test_a_client_distills_on_the_rows_the_instructions_draw_leaves_out(tmp_path):
    """The ClientApp reads the held-out rows from the draw its instruction names (targets
    for the 80 rows it leaves out of 100), and refuses targets that name no draw."""
    node = FakeNode(tmp_path, "kta")
    held_out = protocol.held_out_mask(100, node.cfg.holdout, 12345)
    targets = np.full((100 - int(held_out.sum()), 10), 0.1, np.float32)
    msg = FakeNode.message("train", 2)
    msg.content[protocol.TARGETS] = protocol.pack(targets, key=protocol.TARGETS)
    config = {"server-round": 2, protocol.TARGETS_SUBSET: 0, protocol.TARGETS_HOLDOUT: 12345}
    msg.content[protocol.CONFIG] = ConfigRecord(config)
    answer = train(msg, node.context)
    assert not answer.has_error() and "distill-loss" in answer.content.metric_records["metrics"]
    del config[protocol.TARGETS_HOLDOUT]
    msg.content[protocol.CONFIG] = ConfigRecord(config)
    with pytest.raises(ValueError, match="'targets-holdout'"):
        train(msg, node.context)
