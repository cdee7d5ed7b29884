"""The server's boundary (kta_flwr.flower.validation): a fuzz corpus of malformed replies
against every strategy family. Each round mixes honest replies with the malformed ones;
the strategy must not raise, must log every drop with the sender's node id, and must
aggregate exactly what it aggregates from the honest replies alone."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from kta_flwr.config import RunConfig
from kta_flwr.factory import market_params
from kta_flwr.flower import protocol, sync
from kta_flwr.flower.strategies.compressed import CompressedUpdates
from kta_flwr.flower.strategies.market import KnowledgeMarket
from kta_flwr.flower.strategies.stock import StockStrategy
from kta_flwr.flower.validation import EVALUATE, TRAIN
from kta_flwr.maths.update_compression import ParamLayout, UpdateCodec
from tests.conftest import FixedGrid, client_metrics, reply

pytestmark = pytest.mark.usefixtures("server_identity")

N, C = 20, 4
HONEST = (1, 2, 3, 4)
GOOD_EVAL = {"personalized-accuracy": 0.8, "global-accuracy": 0.7, "test-loss": 0.4,
             "num-examples": 50, "partition-id": 0, "t-setup": 0.1, "t-restore": 0.1,
             "t-evaluate": 0.1, "t-save": 0.1}


def _metric_mutations(good: dict) -> list[tuple[str, dict]]:
    """Ways to break a metric record whose honest form is ``good``."""
    out = [(f"missing {key}", {k: v for k, v in good.items() if k != key})
           for key in good if key != "residual-norm"]  # optional: absent under SVD
    bad_values = [("list", [1.0, 2.0]), ("nan", float("nan")), ("inf", float("inf")),
                  ("-inf", float("-inf")), ("negative", -1.0), ("huge", 1e30)]
    for key in ("num-examples", "train-loss" if "train-loss" in good else "personalized-accuracy"):
        out += [(f"{key}={name}", {**good, key: value}) for name, value in bad_values]
    out += [("num-examples=0", {**good, "num-examples": 0}),
            ("num-examples=2.5", {**good, "num-examples": 2.5}),
            ("partition-id=-1", {**good, "partition-id": -1}),
            ("partition-id=1.5", {**good, "partition-id": 1.5}),
            ("unknown key", {**good, "backdoor": 1.0})]
    return out


def _record_mutations(arrays: dict[str, ArrayRecord], metrics: dict) -> list[tuple[str, RecordDict]]:
    """Ways to break the records around valid ``arrays`` and ``metrics``."""
    good = {**arrays, protocol.METRICS: MetricRecord(metrics)}
    out = [("no metric record", RecordDict(dict(arrays))),
           ("extra metric record", RecordDict({**good, "more": MetricRecord({"a": 1.0})})),
           ("config record", RecordDict({**good, "cfg": ConfigRecord({"a": 1})})),
           ("unknown note", RecordDict({**good, protocol.NOTES: ConfigRecord({"a": "b"})})),
           ("note not a string", RecordDict({**good, protocol.NOTES: ConfigRecord({protocol.RESTORE_FILE: 3})})),
           ("note too long", RecordDict({**good, protocol.NOTES: ConfigRecord({protocol.RESTORE_REASON: "x" * 401})})),
           ("note with a line break", RecordDict({**good, protocol.NOTES: ConfigRecord({protocol.RESTORE_FILE: "a\nb"})})),
           ("extra array record", RecordDict({**good, "extra": ArrayRecord({"x": Array(np.zeros(3))})}))]
    if arrays:
        out.append(("no array record", RecordDict({protocol.METRICS: MetricRecord(metrics)})))
    out += [(f"metrics: {name}", RecordDict({**arrays, protocol.METRICS: MetricRecord(bad)}))
            for name, bad in _metric_mutations(metrics)]
    return out


def _run(strategy, kind: str, honest: list, corpus: list[tuple[str, RecordDict]], server_round: int,
         caplog):
    """One round of ``kind`` with ``honest`` replies and the corpus (from nodes 100, 101, ...):
    returns the aggregate; asserts every malformed sender was logged."""
    bad = [reply(100 + i, content) for i, (_, content) in enumerate(corpus)]
    bad += [reply(999, honest[0].content)]  # a node that was never asked
    bad += [reply(HONEST[0], honest[0].content)]  # a second reply from an honest node
    strategy.screen.expect(kind, [*HONEST, *(100 + i for i in range(len(corpus)))])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        if kind == TRAIN:
            out = strategy.aggregate_train(server_round, [*honest, *bad])
        else:
            out = strategy.aggregate_evaluate(server_round, [*honest, *bad])
    logged = caplog.text
    for i, (name, _) in enumerate(corpus):
        assert f"node {100 + i}:" in logged, f"no warning for malformed reply '{name}'"
    assert "node 999 was not sent" in logged and f"a second {kind} reply from node {HONEST[0]}" in logged
    return out


def _logits(rng, rows=N):
    return rng.normal(size=(rows, C)).astype(np.float32)


def _market():
    rng = np.random.default_rng(0)
    return KnowledgeMarket(
        params=market_params(RunConfig(distill_gate=False)), reference_labels=rng.integers(0, C, N),
        num_classes=C, fingerprint="abc", holdout_fraction=0.25, max_examples=1000,
        evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({"n": float(len(recs))}),
    )


def _logit_corpus(rng) -> list[tuple[str, RecordDict]]:
    metrics = dict(client_metrics(50))
    arrays = {protocol.LOGITS: ArrayRecord({protocol.VALUES: Array(_logits(rng))})}
    values = {
        "nan": np.where(np.eye(N, C, dtype=bool), np.nan, 0.0).astype(np.float32),
        "inf": np.full((N, C), np.inf, np.float32),
        "absurd": np.tile(np.float32([1e4, 0, 0, 0]), (N, 1)),
        "centred 1e3": np.tile(np.float32([1e3, -1e3, 0, 0]), (N, 1)),
        "rows+1": _logits(rng, N + 1), "oversized": _logits(rng, 50 * N),
        "classes+1": rng.normal(size=(N, C + 1)).astype(np.float32),
        "1-D": np.zeros(N, np.float32), "empty": np.zeros((0, C), np.float32),
        "int32": np.zeros((N, C), np.int32), "float64": np.zeros((N, C), np.float64),
    }
    corpus = [(f"logits {k}", RecordDict({protocol.LOGITS: ArrayRecord({protocol.VALUES: Array(v)}),
                                          protocol.METRICS: MetricRecord(metrics)}))
              for k, v in values.items()]
    two = ArrayRecord({protocol.VALUES: Array(_logits(rng)), "w": Array(np.zeros(3, np.float32))})
    corpus.append(("logits extra array", RecordDict({protocol.LOGITS: two, protocol.METRICS: MetricRecord(metrics)})))
    return corpus + _record_mutations(arrays, metrics)


def test_market_drops_every_malformed_reply_and_prices_only_the_honest(caplog):
    rng = np.random.default_rng(1)
    honest = [reply(n, RecordDict({protocol.LOGITS: ArrayRecord({protocol.VALUES: Array(_logits(rng))}),
                                   protocol.METRICS: client_metrics(n)})) for n in HONEST]
    corpus = _logit_corpus(rng)
    assert len(corpus) >= 40
    attacked, clean = _market(), _market()
    _, metrics = _run(attacked, TRAIN, honest, corpus, 1, caplog)
    clean.screen.expect(TRAIN, HONEST)
    _, clean_metrics = clean.aggregate_train(1, honest)
    assert sorted(attacked.bank) == list(HONEST) == sorted(attacked.partition_of)
    assert metrics["replies"] == 4 and metrics["market-clients"] == 4
    for node in HONEST:  # exactly the targets of the honest-only round
        np.testing.assert_array_equal(attacked.targets[node], clean.targets[node])
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert attacked.screen.drain().rejected == len(corpus) + 2


def test_a_partition_is_claimed_once_and_a_node_keeps_its_own(caplog):
    rng = np.random.default_rng(2)
    strategy = _market()

    def logits_from(node: int, partition: int):
        return reply(node, RecordDict({protocol.LOGITS: ArrayRecord({protocol.VALUES: Array(_logits(rng))}),
                                       protocol.METRICS: client_metrics(partition)}))

    strategy.screen.expect(TRAIN, (1, 2))
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, [logits_from(1, 7), logits_from(2, 7)])
    assert not strategy.bank and "partition 7 is also claimed this round by node(s) [1]" in caplog.text
    strategy.screen.expect(TRAIN, (1,))
    strategy.aggregate_train(2, [logits_from(1, 7)])
    assert strategy.partition_of == {1: 7}
    caplog.clear()
    strategy.screen.expect(TRAIN, (1, 2, 3))  # node 2 impersonates partition 7; node 1 moves
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(3, [logits_from(2, 7), logits_from(1, 7), logits_from(3, 3)])
    assert sorted(strategy.bank) == [1, 3] and strategy.partition_of == {1: 7, 3: 3}
    assert "node(s) [1], its holder 1" in caplog.text
    strategy.screen.expect(TRAIN, (1,))
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(4, [logits_from(1, 8)])
    assert "node 1 holds partition 7, not 8" in caplog.text


def _low_rank(rng, size: int) -> np.ndarray:
    """A ``[P]`` update whose 20 x 10 tensor has rank 1 (SVD sends it as factors)."""
    update = rng.normal(size=size).astype(np.float32)
    update[:200] = np.outer(rng.normal(size=20), rng.normal(size=10)).reshape(-1)
    return update


def _update_corpus(codec: UpdateCodec, rng) -> list[tuple[str, RecordDict]]:
    metrics = dict(client_metrics(50, **({"residual-norm": 0.0} if codec.name == "topk" else {})))
    size = codec.layout.size

    def update(payload):
        return RecordDict({sync.UPDATE: sync.to_record(payload), protocol.METRICS: MetricRecord(metrics)})

    good = codec.compress(_low_rank(rng, size), 1)
    if codec.name == "topk":
        k = codec.k
        payloads = {
            "more than k": {"idx": np.arange(k + 5, dtype=np.int64), "val": np.ones(k + 5, np.float32)},
            "1e30 values": {"idx": np.arange(k, dtype=np.int64), "val": np.full(k, 1e30, np.float32)},
            "nan values": {"idx": np.arange(k, dtype=np.int64), "val": np.full(k, np.nan, np.float32)},
            "index out of range": {"idx": np.array([size], np.int64), "val": np.ones(1, np.float32)},
            "unsorted": {"idx": np.array([3, 1], np.int64), "val": np.ones(2, np.float32)},
            "float index": {"idx": np.array([1.0, 2.0]), "val": np.ones(2, np.float32)},
            "float64 values": {"idx": np.array([1, 2], np.int64), "val": np.ones(2)},
            "no val": {"idx": np.array([1, 2], np.int64)},
        }
    else:
        u, s, vt = (good[f"a.{x}"] for x in ("u", "s", "vt"))
        payloads = {
            "1e30 singular values": {**good, "a.s": np.full_like(s, 1e30)},
            "rank above the tensor's": {**good, "a.u": np.ones((20, 11), np.float32),
                                        "a.s": np.ones(11, np.float32), "a.vt": np.ones((11, 10), np.float32)},
            "nan factor": {**good, "a.u": np.full_like(u, np.nan)},
            "factor missing": {k: v for k, v in good.items() if k != "a.vt"},
            "factors misfit": {**good, "a.vt": vt[:, :-1]},
            "extra tensor": {**good, "c": np.zeros(3, np.float32)},
            "tensor missing": {k: v for k, v in good.items() if k != "b"},
        }
    corpus = [(name, update(p)) for name, p in payloads.items()]
    return corpus + _record_mutations({sync.UPDATE: sync.to_record(good)}, metrics)


@pytest.mark.parametrize("name", ["topk", "svd"])
def test_compressed_baselines_average_only_the_honest_updates(name, caplog):
    rng = np.random.default_rng(3)
    layout = ParamLayout(("a", "b"), ((20, 10), (10,)))
    codec = UpdateCodec(layout, name, fraction=0.05, energy=0.9, energy_end=0.9)

    def strategy():
        return CompressedUpdates(codec=codec, initial=np.zeros(layout.size, np.float32),
                                 evaluate_global=True, label=name, max_examples=1000,
                                 evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({}))

    extra = {"residual-norm": 0.0} if name == "topk" else {}
    honest = [reply(n, RecordDict({
        sync.UPDATE: sync.to_record(codec.compress(_low_rank(rng, layout.size), 1)),
        protocol.METRICS: client_metrics(n, 10 * n, **extra)})) for n in HONEST]
    corpus = _update_corpus(codec, rng)
    attacked, clean = strategy(), strategy()
    _, metrics = _run(attacked, TRAIN, honest, corpus, 1, caplog)
    clean.screen.expect(TRAIN, HONEST)
    clean.aggregate_train(1, honest)
    assert metrics["replies"] == 4
    np.testing.assert_array_equal(attacked.log.vector, clean.log.vector)
    assert np.isfinite(attacked.log.vector).all()


def _model():
    return {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32),
            "steps": np.zeros((), np.int64)}


def _model_corpus(rng) -> list[tuple[str, RecordDict]]:
    metrics = dict(client_metrics(50))
    model = _model()

    def arrays(**changes):
        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in {**model, **changes}.items()}),
                           protocol.METRICS: MetricRecord(metrics)})

    corpus = [
        ("nan weights", arrays(w=np.full((3, 2), np.nan, np.float32))),
        ("1e30 weights", arrays(w=np.full((3, 2), 1e30, np.float32))),
        ("wrong shape", arrays(w=np.zeros((2, 3), np.float32))),
        ("wrong dtype", arrays(b=np.zeros(2, np.float64))),
        ("missing array", RecordDict({"arrays": ArrayRecord({"w": Array(model["w"])}),
                                      protocol.METRICS: MetricRecord(metrics)})),
        ("extra array", arrays(x=np.zeros(2, np.float32))),
        ("oversized", arrays(w=rng.normal(size=(3000, 2)).astype(np.float32))),
    ]
    return corpus + _record_mutations({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()})}, metrics)


@pytest.mark.parametrize("name", ["fedavg", "fedmedian", "krum", "fedtrimmedavg"])
def test_stock_strategies_aggregate_only_the_honest_models(name, caplog):
    rng = np.random.default_rng(4)
    extra = {"num_malicious_nodes": 1} if name == "krum" else {}

    def strategy():
        return StockStrategy(name=name, initial_arrays=ArrayRecord({k: Array(v) for k, v in _model().items()}),
                             flower_options=extra, max_examples=1000,
                             evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({}))

    def honest_model(n):
        return {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.full(2, n, np.float32),
                "steps": np.array(n, np.int64)}

    models = {n: honest_model(n) for n in HONEST}

    def honest():  # fresh messages: FedMedian pops the arrays out of the replies it reads
        return [reply(n, RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in models[n].items()}),
                                     protocol.METRICS: client_metrics(n, 10 * n)})) for n in HONEST]

    attacked, clean = strategy(), strategy()
    for made in (attacked, clean):
        made.configure_train(1, ArrayRecord({k: Array(v) for k, v in _model().items()}), ConfigRecord(),
                             FixedGrid(list(HONEST)))
    corpus = _model_corpus(rng)
    arrays, _ = _run(attacked, TRAIN, honest(), corpus, 1, caplog)
    clean.screen.expect(TRAIN, HONEST)
    expected, _ = clean.aggregate_train(1, honest())
    for key in ("w", "b"):
        np.testing.assert_array_equal(arrays[key].numpy(), expected[key].numpy())
    # integer buffers (BatchNorm's counters) keep their dtype, so next round's honest
    # replies, which carry them as int64, still pass the boundary
    assert arrays["steps"].numpy().dtype == np.int64
    clean.configure_train(2, expected, ConfigRecord(), FixedGrid(list(HONEST)))
    assert clean.aggregate_train(2, honest())[1]["replies"] == len(HONEST)


def test_evaluation_replies_cannot_corrupt_the_mean(caplog):
    strategy = _market()
    honest = [reply(n, RecordDict({protocol.METRICS: MetricRecord({**GOOD_EVAL, "partition-id": n})}))
              for n in HONEST]
    corpus = [(name, RecordDict({protocol.METRICS: MetricRecord(bad)}))
              for name, bad in _metric_mutations(GOOD_EVAL)]
    corpus += [("personalized-accuracy=1e9", RecordDict({protocol.METRICS: MetricRecord({**GOOD_EVAL, "personalized-accuracy": 1e9})})),
               ("no metric record", RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(2))})})),
               ("empty", RecordDict())]
    out = _run(strategy, EVALUATE, honest, corpus, 1, caplog)
    assert out["n"] == 4.0


def test_the_corpus_has_at_least_a_hundred_malformed_replies():
    rng = np.random.default_rng(5)
    layout = ParamLayout(("a", "b"), ((20, 10), (10,)))
    sizes = [len(_logit_corpus(rng)), len(_model_corpus(rng)), len(_metric_mutations(GOOD_EVAL)) + 3]
    sizes += [len(_update_corpus(UpdateCodec(layout, n, fraction=0.05, energy=0.9), rng)) for n in ("topk", "svd")]
    assert sum(sizes) >= 100, sizes
