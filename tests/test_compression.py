"""Compressed updates: Top-k + error feedback, SA-PEF, SVD, the versioned sync protocol and
the compressed-update strategy's handling of good and bad replies."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from kta_flwr.flower import protocol, sync
from kta_flwr.maths.update_compression import (
    CompressionError, ParamLayout, UpdateCodec, densify, energy_rank, error_feedback,
    sapef_start, sapef_vector, sparsify, svd_compress, svd_decompress,
)
from kta_flwr.maths.payload import payload_bytes
from kta_flwr.task.models import ModelSpec, build_model
from kta_flwr.flower.strategies.compressed import CompressedUpdates
from tests.conftest import FixedGrid, client_metrics, reply

P = 1000


def _train(start: np.ndarray, data: np.ndarray, steps: int = 5, lr: float = 0.1) -> np.ndarray:
    """A nonconvex local trainer: gradient steps on sum(sin(w) * data + 0.1 w^2)."""
    w = start.astype(np.float64)
    for _ in range(steps):
        w = w - lr * (np.cos(w) * data + 0.2 * w)
    return w.astype(np.float32)


def test_topk_keeps_the_k_largest_magnitudes_and_counts_bytes():
    v = np.array([0.1, -5.0, 2.0, 0.0, -3.0, 4.0], np.float32)
    payload = sparsify(v, 3)
    assert payload["idx"].tolist() == [1, 4, 5] and payload["val"].tolist() == [-5.0, -3.0, 4.0]
    assert payload["idx"].dtype == np.int32 and payload_bytes(payload) == 3 * 8
    np.testing.assert_array_equal(densify(payload, 6), [0, -5, 0, 0, -3, 4])


def test_error_feedback_keeps_the_residual_exactly():
    """Over many rounds, everything sent plus the residual equals the accumulated update."""
    rng = np.random.default_rng(0)
    residual, sent_total, update_total = np.zeros(P, np.float32), np.zeros(P), np.zeros(P)
    for _ in range(20):
        update = rng.integers(-1000, 1000, P).astype(np.float32)  # exact in float32
        payload, new_residual = error_feedback(update + residual, k=17)
        np.testing.assert_array_equal(densify(payload, P) + new_residual, update + residual)
        assert np.count_nonzero(densify(payload, P)) <= 17
        sent_total += densify(payload, P)
        update_total += update
        residual = new_residual
    np.testing.assert_array_equal(sent_total + residual, update_total)


def test_sapef_with_alpha_zero_is_error_feedback_and_alpha_one_is_not():
    rng = np.random.default_rng(1)
    data = rng.normal(size=P)
    x = rng.normal(size=P).astype(np.float32)

    def rounds(alpha):
        """Three rounds of SA-PEF against a fixed global model x, the residual carried."""
        residual, sent = np.zeros(P, np.float32), []
        for _ in range(3):
            y = _train(sapef_start(x, residual, alpha), data)
            payload, residual = error_feedback(sapef_vector(y, x, residual, alpha), 50)
            sent.append(densify(payload, P))
        return sent, residual

    def plain_ef():
        """Textbook EF: train from x, compress update + residual, keep the rest."""
        residual, sent = np.zeros(P, np.float32), []
        for _ in range(3):
            v = (_train(x, data) - x) + residual
            keep = np.argsort(-np.abs(v), kind="stable")[:50]
            c = np.zeros(P, np.float32)
            c[keep] = v[keep]
            sent.append(c)
            residual = v - c
        return sent, residual

    (ef_sent, ef_res), (sa0_sent, sa0_res) = plain_ef(), rounds(0.0)
    for a, b in zip(ef_sent, sa0_sent):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ef_res, sa0_res)
    sa1_sent, _ = rounds(1.0)
    np.testing.assert_array_equal(sa1_sent[0], ef_sent[0])  # no residual yet in round 1
    assert not np.array_equal(sa1_sent[1], ef_sent[1])  # stepped ahead afterwards


def test_sapef_conserves_local_progress_for_any_alpha():
    """Sent + residual = what the client moved from where it started + the old residual."""
    rng = np.random.default_rng(2)
    x, residual = rng.normal(size=P).astype(np.float32), rng.normal(size=P).astype(np.float32)
    for alpha in (0.0, 0.3, 1.0):
        start = sapef_start(x, residual, alpha)
        y = _train(start, rng.normal(size=P))
        payload, new_residual = error_feedback(sapef_vector(y, x, residual, alpha), 40)
        np.testing.assert_allclose(densify(payload, P) + new_residual, (y - start) + residual,
                                   atol=1e-5)


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95, 0.99])
def test_svd_respects_the_energy_threshold(energy):
    rng = np.random.default_rng(3)
    m, n = 64, 48
    w = (rng.normal(size=(m, n)) @ np.diag(0.8 ** np.arange(n)) @ rng.normal(size=(n, n))).astype(np.float32)
    payload = svd_compress({"w": w, "b": np.ones(5, np.float32)}, energy)
    r = len(payload["w.s"])
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    kept = (s[:r] ** 2).sum() / (s**2).sum()
    assert kept >= energy - 1e-6
    assert r == 1 or (s[: r - 1] ** 2).sum() / (s**2).sum() < energy  # smallest such rank
    layout = ParamLayout(("w", "b"), ((m, n), (5,)))
    back = layout.unflatten(svd_decompress(payload, layout))
    error = ((back["w"] - w).astype(np.float64) ** 2).sum() / (w.astype(np.float64) ** 2).sum()
    assert error <= (1 - energy) + 1e-5
    np.testing.assert_array_equal(back["b"], np.ones(5))
    assert payload_bytes(payload) == 4 * (r * (m + n + 1) + 5)


def test_svd_keeps_tensors_dense_where_factors_would_not_be_smaller():
    rng = np.random.default_rng(4)
    payload = svd_compress({"w": rng.normal(size=(4, 4)).astype(np.float32)}, 0.99)
    assert list(payload) == ["w"] and payload["w"].shape == (16,)
    conv = rng.normal(size=(8, 3, 5, 5)).astype(np.float32)
    rank1 = np.outer(np.arange(1, 9), np.arange(75)).reshape(8, 3, 5, 5).astype(np.float32)
    payload = svd_compress({"conv": rank1}, 0.9)
    assert payload["conv.s"].shape == (1,)
    layout = ParamLayout(("conv",), ((8, 3, 5, 5),))
    np.testing.assert_allclose(svd_decompress(payload, layout), rank1.reshape(-1), rtol=1e-4)
    assert energy_rank(np.linalg.svd(conv.reshape(8, -1), compute_uv=False), 1.0) == 8


@pytest.mark.parametrize(
    "payload, match",
    [
        ({"idx": np.array([3, 1], np.int32), "val": np.ones(2, np.float32)}, "ascending"),
        ({"idx": np.array([P], np.int32), "val": np.ones(1, np.float32)}, "ascending"),
        ({"idx": np.array([1], np.int32), "val": np.array([np.nan], np.float32)}, "NaN"),
        ({"idx": np.array([1], np.int32), "val": np.ones(1, np.float64)}, "float32"),
        ({"idx": np.array([1], np.int32)}, "'idx' and 'val'"),
    ],
)
def test_malformed_sparse_payloads_are_rejected(payload, match):
    with pytest.raises(CompressionError, match=match):
        densify(payload, P)


def test_layout_round_trips_a_model_and_skips_integer_buffers():
    model = build_model("resnet18", ModelSpec((3, 32, 32), 10), 0)
    state = model.state_dict()
    layout = ParamLayout.of(state)
    assert not any(name.endswith("num_batches_tracked") for name in layout.names)
    vector = layout.flatten(state)
    assert vector.shape == (layout.size,) and layout.size > 11_000_000
    back = layout.unflatten(vector)
    assert all(torch.equal(torch.from_numpy(np.array(back[k])), state[k].float()) for k in layout.names)


# --- the versioned sync protocol ----------------------------------------------------
def _codec(name="topk"):
    layout = ParamLayout(("a", "b"), ((20, 10), (10,)))
    return UpdateCodec(layout, name, fraction=0.05, energy=0.9, energy_end=0.9)


def _content(records):
    return RecordDict({**records})


def test_clients_stay_bit_identical_with_the_server_through_catch_ups():
    rng = np.random.default_rng(5)
    codec = _codec()
    initial = rng.normal(size=codec.layout.size).astype(np.float32)
    log = sync.ModelLog(initial, codec)
    held = {1: None, 2: None}
    for rnd in range(1, 6):
        for node in (1, 2):
            if node == 2 and rnd in (2, 3):  # node 2 is not sampled in rounds 2 and 3
                continue
            msg = _content(log.records_for(node))
            held[node] = sync.catch_up(msg, held[node], lambda: initial.copy(), codec)
            np.testing.assert_array_equal(held[node][0], log.vector)
            log.acknowledge(node, held[node][1])
        update = np.where(rng.random(codec.layout.size) < 0.1, rng.normal(size=codec.layout.size), 0)
        log.commit(codec.compress_aggregate(update.astype(np.float32), rnd))
    # Node 2 missed rounds: it gets several update records, not the dense model.
    records = log.records_for(2)
    assert sync.GLOBAL not in records and records[sync.SYNC]["version"] == 5


def test_dense_model_for_lost_nodes_and_loud_mismatches():
    codec = _codec()
    initial = np.ones(codec.layout.size, np.float32)
    log = sync.ModelLog(initial, codec)
    log.acknowledge(1, 0)
    log.commit(codec.compress_aggregate(np.full(codec.layout.size, 0.5, np.float32), 1))
    log.lost(1)
    records = log.records_for(1)
    assert sync.GLOBAL in records and records[sync.SYNC]["base-version"] == sync.DENSE
    vector, version = sync.catch_up(_content(records), None, lambda: initial, codec)
    assert version == 1 and np.array_equal(vector, log.vector)

    fresh = sync.ModelLog(initial, codec)
    with pytest.raises(sync.SyncError, match="initial model differs"):
        sync.catch_up(_content(fresh.records_for(3)), None, lambda: initial * 2, codec)
    fresh.acknowledge(3, 0)
    fresh.commit(codec.compress_aggregate(np.eye(1, codec.layout.size, 4, np.float32)[0], 1))
    fresh.acknowledge(3, 1)
    fresh.commit(codec.compress_aggregate(np.eye(1, codec.layout.size, 7, np.float32)[0], 2))
    with pytest.raises(sync.SyncError, match="holds version 0"):
        sync.catch_up(_content(fresh.records_for(3)), (initial, 0), lambda: initial, codec)
    with pytest.raises(sync.SyncError, match="no 'sync' record"):
        sync.catch_up(RecordDict(), None, lambda: initial, codec)


# --- the strategy ------------------------------------------------------------------
def _update_reply(node_id, payload, examples=10):
    return reply(node_id, RecordDict({
        sync.UPDATE: sync.to_record(payload),
        protocol.METRICS: client_metrics(node_id, examples, **{"residual-norm": 0.0}),
    }))


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("name", ["topk", "svd"])
def test_strategy_averages_good_updates_and_drops_bad_ones(name):
    codec = _codec(name)
    size = codec.layout.size
    strategy = CompressedUpdates(
        codec=codec, initial=np.zeros(size, np.float32), evaluate_global=True, label=name,
        evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({"n": len(recs)}),
    )
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FixedGrid([1, 2, 3, 4, 5])))
    assert all(m.content.config_records[sync.SYNC]["base-version"] == 0 for m in messages)
    one = np.zeros(size, np.float32)
    one[:5] = 1.0
    nan = sparsify(np.ones(size, np.float32), 3)
    nan["val"][0] = np.nan
    replies = [
        _update_reply(1, codec.compress(one, 1), examples=10),
        _update_reply(2, codec.compress(3 * one, 1), examples=30),
        _update_reply(3, {"idx": nan["idx"], "val": nan["val"]} if name == "topk" else {"bogus": one}),
        reply(4, error="client crashed"),
        reply(5, RecordDict({protocol.METRICS: client_metrics(5, 1)})),  # no update
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["replies"] == 2 and metrics["dropped"] == 3
    np.testing.assert_allclose(strategy.log.vector[:5], 2.5, rtol=1e-5)  # (10*1 + 30*3) / 40
    assert strategy.log.version == 1
    # The crashed node gets the dense model; the others one update.
    messages = {m.metadata.dst_node_id: m for m in
                strategy.configure_train(2, ArrayRecord(), ConfigRecord(), FixedGrid([1, 4]))}
    assert sync.GLOBAL in messages[4].content.array_records
    assert f"{sync.UPDATE_PREFIX}1" in messages[1].content.array_records


def test_a_whole_reply_as_the_client_builds_it_round_trips():
    """Array names survive Flower's ArrayRecord (the SVD payload keys contain dots)."""
    codec = _codec("svd")
    rng = np.random.default_rng(6)
    payload = codec.compress(rng.normal(size=codec.layout.size).astype(np.float32), 1)
    record = sync.to_record(payload)
    back = sync.from_record(ArrayRecord({k: Array(v.numpy()) for k, v in record.items()}))
    assert set(back) == set(payload)
    np.testing.assert_array_equal(codec.decompress(back), codec.decompress(payload))


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("rule", ["mean", "median", "trimmed-mean"])
@pytest.mark.parametrize("name", ["topk", "svd"])
def test_robust_aggregation_bounds_a_negated_update(name, rule):
    """Four honest updates and one negated x10 (``attack = "negated"``): the weighted mean
    moves against the honest direction; the coordinate-wise median and the trimmed mean
    stay within the honest updates, coordinate by coordinate."""
    codec = _codec(name)
    size = codec.layout.size
    strategy = CompressedUpdates(
        codec=codec, initial=np.zeros(size, np.float32), evaluate_global=True, label=name,
        aggregation=rule, trim_beta=0.2,
        evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({"n": len(recs)}),
    )
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FixedGrid([1, 2, 3, 4, 5])))
    direction = np.zeros(size, np.float32)
    direction[:10] = np.linspace(1.0, 2.0, 10)  # row 0 of tensor a: rank 1, inside the top-k
    honest = [codec.decompress(codec.compress((1 + 0.1 * i) * direction, 1)) for i in range(4)]
    attacker = codec.compress(-10 * honest[0], 1)
    replies = [_update_reply(i + 1, codec.compress(u, 1)) for i, u in enumerate(honest)]
    strategy.aggregate_train(1, [*replies, _update_reply(5, attacker)])
    moved = strategy.log.vector[:10]
    low, high = np.min(honest, axis=0)[:10], np.max(honest, axis=0)[:10]
    if rule == "mean":
        assert (moved < 0).all()  # the attacker outweighs four honest clients
    else:
        assert ((moved >= low - 1e-5) & (moved <= high + 1e-5)).all()


@pytest.mark.usefixtures("server_identity")
def test_a_negated_compressed_attacker_sends_minus_s_times_its_update(tmp_path):
    """``attack = "negated"`` on fedavg-topk, through the real ClientApp: the attacker's
    upload is its honest update times ``-attack-scale`` (same positions)."""
    from client_app.app import train  # pylint: disable=import-outside-toplevel
    from kta_flwr.client.attacks import attackers  # pylint: disable=import-outside-toplevel
    from kta_flwr.config import parse_run_config  # pylint: disable=import-outside-toplevel
    from tests.conftest import NODE_BASE, FakeNode  # pylint: disable=import-outside-toplevel

    cfg = parse_run_config({**NODE_BASE, "strategy": "fedavg-topk", "attack": "negated",
                            "attack-fraction": 0.5})
    partition = min(attackers(cfg, 4))
    uploads = {}
    for attack in ("none", "negated"):
        node = FakeNode(tmp_path / attack, "fedavg-topk", partition, attack=attack,
                        attack_fraction=0.5 if attack != "none" else 0.0)
        model = build_model("mlp", ModelSpec((64,), 10, 0, 1), node.cfg.seed)
        layout = ParamLayout.of(model.state_dict())
        server = sync.ModelLog(layout.flatten(model.state_dict()), UpdateCodec(layout, "topk", fraction=0.01))
        msg = node.message("train", 1)
        for key, record in server.records_for(11).items():
            msg.content[key] = record
        out = train(msg, node.context)
        uploads[attack] = sync.from_record(out.content.array_records[sync.UPDATE])
    np.testing.assert_array_equal(uploads["negated"]["idx"], uploads["none"]["idx"])
    np.testing.assert_allclose(uploads["negated"]["val"], -10 * uploads["none"]["val"], rtol=1e-6)
