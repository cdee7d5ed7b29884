"""The maths of the peers that run mixed fleets: HeteroFL's sub-models and FedProto's
prototypes (kta_flwr.maths.heterofl, kta_flwr.maths.prototypes)."""

from __future__ import annotations

import numpy as np
import pytest

from kta_flwr.maths.heterofl import aggregate, extract
from kta_flwr.maths.prototypes import aggregate_prototypes, class_prototypes


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
