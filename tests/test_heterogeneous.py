"""The peers that run mixed fleets: HeteroFL's sub-models and FedProto's prototypes
(kta_flwr.maths.heterofl, kta_flwr.maths.prototypes) and their strategies, with the
common-architecture FedAvg (kta_flwr.flower.strategies)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from kta_flwr.client import parameters
from kta_flwr.client.node import Node
from kta_flwr.flower import protocol
from kta_flwr.flower.metering import payload_bytes
from kta_flwr.flower.strategies.common import CommonFedAvg
from kta_flwr.flower.strategies.heterofl import HeteroFL
from kta_flwr.flower.strategies.prototypes import PROTOTYPES, FedProto, prototype_record
from kta_flwr.maths.heterofl import aggregate, extract
from kta_flwr.maths.prototypes import aggregate_prototypes, class_prototypes
from kta_flwr.task.models import ModelSpec, build_model
from tests.conftest import FakeNode, FixedGrid, client_metrics, reply


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv": rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
            "bias": rng.normal(size=4).astype(np.float32),
            "head": rng.normal(size=(10, 4)).astype(np.float32)}


SMALL = {"conv": (1, 3, 2, 2), "bias": (1,), "head": (10, 1)}  # width rate 1/4
HALF = {"conv": (2, 3, 2, 2), "bias": (2,), "head": (10, 2)}  # width rate 1/2


def test_a_sub_model_is_the_leading_block_of_every_tensor():
    full = _global()
    half = extract(full, HALF)
    np.testing.assert_array_equal(half["conv"], full["conv"][:2])
    np.testing.assert_array_equal(half["head"], full["head"][:, :2])
    half["bias"][:] = 0.0  # a copy: the global model is untouched
    assert (full["bias"][:2] != 0.0).all()
    with pytest.raises(ValueError, match="'head'.*does not fit"):
        extract(full, {**HALF, "head": (11, 2)})


def test_each_entry_is_averaged_over_exactly_the_clients_that_hold_it():
    full = _global()
    clients = [{name: np.full(shape, value, np.float32) for name, shape in shapes.items()}
               for shapes, value in ((SMALL, 1.0), (HALF, 3.0), (HALF, 8.0))]
    merged = aggregate(full, clients)
    bias = merged["bias"]
    assert bias[0] == pytest.approx(4.0)  # all three hold it: (1 + 3 + 8) / 3
    np.testing.assert_allclose(bias[1], 5.5)  # the two halves: (3 + 8) / 2
    np.testing.assert_array_equal(bias[2:], full["bias"][2:])  # no one: the global value
    np.testing.assert_allclose(merged["head"][:, 0], 4.0)
    np.testing.assert_allclose(merged["head"][:, 1], 5.5)
    np.testing.assert_array_equal(merged["head"][:, 2:], full["head"][:, 2:])
    assert {k: (v.shape, v.dtype) for k, v in merged.items()} == {
        k: (v.shape, v.dtype) for k, v in full.items()}
    # a full-width client alone gives back what it trained
    alone = aggregate(full, [{k: v + 1.0 for k, v in full.items()}])
    np.testing.assert_allclose(alone["conv"], full["conv"] + 1.0)


def test_prototypes_are_class_means_and_the_global_ones_average_their_holders():
    embeddings = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 1.0]])
    prototypes, classes = class_prototypes(embeddings, np.array([2, 2, 0, 2]), num_classes=4)
    np.testing.assert_array_equal(classes, [0, 2])
    np.testing.assert_allclose(prototypes, [[5.0, 5.0], [4 / 3, 1.0]])
    assert prototypes.dtype == np.float32 and classes.dtype == np.int32
    # bytes up: m x d float32 plus m int32 class ids, m the classes the client holds
    assert prototypes.nbytes + classes.nbytes == 2 * 2 * 4 + 2 * 4
    other = (np.array([[1.0, 1.0]], np.float32), np.array([2], np.int32))
    merged, held = aggregate_prototypes([(prototypes, classes), other], num_classes=4, dim=2)
    np.testing.assert_array_equal(held, [True, False, True, False])
    np.testing.assert_allclose(merged, [[5.0, 5.0], [0.0, 0.0], [(4 / 3 + 1) / 2, 1.0], [0.0, 0.0]])
    assert merged.nbytes == 4 * 2 * 4  # down: C x d float32 (and the [C] mask)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        class_prototypes(embeddings, np.array([0, 1, 2, 4]), num_classes=4)


@pytest.mark.parametrize("name, shape", [("simplecnn", (3, 32, 32)), ("resnet8", (3, 32, 32)),
                                         ("femnist_cnn", (1, 28, 28)), ("cnn", (1, 8, 8)),
                                         ("mlp", (1, 8, 8))])
def test_width_scaled_models_are_leading_blocks_of_the_full_one(name, shape):
    """HeteroFL on the real models: a width-1/4 and a width-1/2 model take their weights
    from the full one and run; aggregating them back keeps the full shapes."""
    import torch  # the task layer: the maths above needs no torch

    from kta_flwr.task.models import ModelSpec, build_model

    spec = ModelSpec(shape, 10)
    state = lambda model: {k: v.numpy() for k, v in model.state_dict().items()}  # noqa: E731
    full = state(build_model(name, spec, 0))
    trained = []
    for width in (0.25, 0.5):
        model = build_model(name, spec, 1, width=width)
        sub = extract(full, {k: v.shape for k, v in state(model).items()})
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sub.items()})
        assert model(torch.zeros(2, *shape)).shape == (2, 10)
        trained.append(sub)
    merged = aggregate(full, trained)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in full.items()}
    with pytest.raises(ValueError, match="cannot be built at width"):
        build_model("resnet18", spec, 0, width=0.5)


# --- the strategies on Flower's Message API (kta_flwr.flower.strategies) -------------------

def _arrays(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in tensors.items()})


def _heterofl(static_batch_norm: bool = True) -> HeteroFL:
    """Three nodes 5, 6, 7 holding partitions 0, 1, 2 of tiers 0 (1/4), 1 (1/2), 2 (whole)."""
    return HeteroFL(initial_arrays=_arrays(_global()), tier_shapes=[SMALL, HALF, _shapes(_global())],
                    tier_of=lambda partition: partition, static_batch_norm=static_batch_norm,
                    evaluate_metrics_aggr_fn=lambda *_: None, max_examples=100)


def _shapes(tensors: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: value.shape for name, value in tensors.items()}


def _content(node: int, partition: int, record: str, arrays: ArrayRecord, **metrics: float) -> Message:
    return reply(node, RecordDict({"metrics": client_metrics(partition, **metrics), record: arrays}))


@pytest.mark.usefixtures("server_identity")
def test_heterofl_sends_each_tier_its_sub_model_and_averages_each_entry_over_its_holders(caplog):
    strategy, full = _heterofl(), _global()
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), FixedGrid([5, 6, 7]))
    sent = {m.metadata.dst_node_id: {k: v.numpy() for k, v in m.content.array_records["arrays"].items()}
            for m in messages}
    assert strategy.partition_of == {5: 0, 6: 1, 7: 2}  # asked once, by a query
    assert [_shapes(sent[n]) for n in (5, 6, 7)] == [SMALL, HALF, _shapes(full)]
    np.testing.assert_array_equal(sent[6]["head"], full["head"][:, :2])
    trained = {n: {k: np.full_like(v, float(n)) for k, v in sent[n].items()} for n in sent}
    wrong = {k: np.zeros(v, np.float32) for k, v in HALF.items()}  # node 5 returns the 1/2 model
    with caplog.at_level(logging.WARNING):
        _, metrics = strategy.aggregate_train(1, [_content(5, 0, "arrays", _arrays(wrong)),
                                                  _content(6, 1, "arrays", _arrays(trained[6])),
                                                  _content(7, 2, "arrays", _arrays(trained[7]))])
    assert "dropping train reply of node 5: array 'arrays/conv': is float32[2, 3, 2, 2], the model's is float32[1, 3, 2, 2]" in caplog.text
    assert metrics["replies"] == 2 and metrics["dropped"] == 1
    conv = strategy.global_model()["conv"]
    assert (conv[:2] == 6.5).all() and (conv[2:] == 7.0).all()  # held by 6 and 7, then 7 alone


@pytest.mark.usefixtures("server_identity")
def test_fedproto_sends_c_by_d_floats_each_way_and_averages_each_class_over_its_holders(caplog):
    num_classes, dim = 10, 4
    strategy = FedProto(num_classes=num_classes, dim=dim, evaluate_metrics_aggr_fn=lambda *_: None,
                        max_examples=100)
    first = strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), FixedGrid([5, 6, 7]))
    assert all(not m.content.array_records for m in first)  # no prototypes before round 1
    uploads = {5: (np.ones((2, dim)), [0, 1]), 6: (3 * np.ones((3, dim)), [1, 2, 9]),
               7: (np.ones((2, dim)), [3, 3])}  # node 7: a class twice
    replies = [_content(n, n - 5, PROTOTYPES, prototype_record(v, c), **{"t-predict": 0.1})
               for n, (v, c) in uploads.items()]
    up = sum(payload_bytes(r.content) for r in replies[:2])
    assert up == (2 + 3) * (dim * 4 + 4)  # per class held: d float32 and its int32 id
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert "dropping train reply of node 7: array 'prototypes/classes': must be distinct" in caplog.text
    (message, *_) = strategy.configure_train(2, ArrayRecord(), ConfigRecord({}), FixedGrid([5, 6, 7]))
    values, classes = (message.content.array_records[PROTOTYPES][k].numpy() for k in ("values", "classes"))
    assert classes.tolist() == [0, 1, 2, 9] and values.shape == (4, dim)  # <= C x d down
    assert values[:, 0].tolist() == [1.0, 2.0, 3.0, 3.0]  # class 1: the mean of its two holders
    assert payload_bytes(message.content) == 4 * (dim * 4 + 4)


@pytest.mark.usefixtures("server_identity")
def test_common_fedavg_averages_only_the_common_architecture_the_others_train_alone(caplog):
    model = _global()
    strategy = CommonFedAvg(initial_arrays=_arrays(model), is_member=lambda partition: partition != 1,
                            evaluate_metrics_aggr_fn=lambda *_: None, max_examples=100)
    messages = strategy.configure_train(1, _arrays(model), ConfigRecord({}), FixedGrid([5, 6, 7]))
    carries = {m.metadata.dst_node_id: bool(m.content.array_records) for m in messages}
    assert carries == {5: True, 6: False, 7: True}
    ones = {k: np.ones_like(v) for k, v in model.items()}
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, [
            _content(5, 0, "arrays", _arrays(ones)), _content(6, 1, "arrays", _arrays(ones)),
            reply(7, RecordDict({"metrics": client_metrics(2)}))])
    assert "dropping train reply of node 6: record 'arrays': is not an array record" in caplog.text
    assert "dropping train reply of node 7: record 'arrays': is missing" in caplog.text
    assert metrics["replies"] == 1 and (arrays["conv"].numpy() == 1.0).all()


@pytest.mark.usefixtures("server_identity")
def test_heterofl_asks_for_static_batch_norm_and_the_node_recomputes_it(tmp_path):
    """The paper's static BN: HeteroFL's evaluate instructions ask each node to recompute
    the BatchNorm statistics of its sub-model on its own training inputs (statistics
    averaged over other widths do not describe its activations); off, they are not asked."""
    grid = FixedGrid([5, 6, 7])
    asked = [m.content.config_records["config"] for m in _heterofl().configure_evaluate(1, ArrayRecord(), ConfigRecord({}), grid)]
    assert [config[protocol.STATIC_BATCH_NORM] for config in asked] == [True, True, True]
    off = _heterofl(static_batch_norm=False).configure_evaluate(1, ArrayRecord(), ConfigRecord({}), grid)
    assert all(protocol.STATIC_BATCH_NORM not in m.content.config_records["config"] for m in off)

    fake = FakeNode(tmp_path, "heterofl", models="resnet8")
    state = build_model("resnet8", ModelSpec((1, 8, 8), 10), 0).state_dict()
    stale = [name for name in state if name.endswith("running_mean")]
    for name in stale:
        state[name].fill_(100.0)  # statistics that describe no client's activations
    for flagged in (False, True):
        msg = fake.message("evaluate", 1, arrays=state)
        msg.content.config_records["config"][protocol.STATIC_BATCH_NORM] = flagged
        model = parameters.evaluation_model(Node(msg, fake.context), msg).state_dict()
        recomputed = [name for name in stale if not (model[name] == 100.0).all()]
        assert recomputed == (stale if flagged else []), flagged
