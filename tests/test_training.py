"""Client-side torch routines on real digits data, tiny and seeded."""

import numpy as np
import pytest
import torch

from kta_flwr.config import RunConfig, parse_run_config, stored_run_config
from kta_flwr.task.splits import load_client_data
from kta_flwr.task.models import build_model
from kta_flwr.task.training import (
    Optim, distill, evaluate, label_mix_weights, mutual_distill, recalibrate_batch_norm, shifts_and_flips,
    train_supervised, train_with_prototypes,
)
from tests.conftest import FakeNode

CPU = torch.device("cpu")
OPT = Optim(lr=0.05, momentum=0.9)


def _trained_client():
    data = load_client_data(RunConfig(), partition_id=0, num_partitions=2)
    splits = data.splits
    model = build_model("cnn", splits.spec, seed=0)
    train_supervised(
        model, data.train.x, data.train.y, epochs=3, batch_size=32, optim=OPT, device=CPU, seed=0
    )
    return data, model


def _personal_acc(data, model) -> float:
    test = data.test
    return evaluate(model, test.x, test.y, data.label_distribution, CPU).personalized_accuracy


def test_private_term_keeps_what_the_client_learnt():
    """Distilling toward wrong targets (every reference sample -> class 0) erases a model;
    pairing each reference batch with a private CE batch keeps most of it."""
    data, model = _trained_client()
    before = _personal_acc(data, model)
    ref = data.reference
    wrong = np.zeros((len(ref.y), data.splits.num_classes), np.float32)
    wrong[:, 0] = 1.0
    results = {}
    for weight in (0.0, 1.0):
        copy = build_model("cnn", data.splits.spec, seed=0)
        copy.load_state_dict(model.state_dict())
        distill(
            copy, ref.x, wrong, epochs=3, batch_size=32, optim=OPT, device=CPU, seed=1,
            temperature=1.0, kl_weight=1.0, private=(data.train.x, data.train.y),
            private_weight=weight,
        )
        results[weight] = _personal_acc(data, copy)
    assert before > 0.7
    assert results[0.0] < 0.4  # pure distillation forgot the private data
    assert results[1.0] > results[0.0] + 0.25


def test_label_mix_weights_follow_the_clients_own_classes():
    targets = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    balanced = np.array([0, 1, 2] * 4)
    for public in (balanced, None):  # None: no public labels, taken to be balanced
        weights = label_mix_weights(targets, np.array([0] * 8 + [1] * 2), public, 3)  # mix (9, 3, 1) / 13
        np.testing.assert_allclose(weights, np.array([9, 3, 1, 9]) / 5.5, rtol=1e-6)
        assert weights.dtype == np.float32 and abs(weights.mean() - 1.0) < 1e-6
    soft = np.full((2, 3), 1 / 3, np.float32)  # a row that names no class weighs the mean
    np.testing.assert_allclose(label_mix_weights(soft, np.array([0, 1]), balanced, 3), 1.0, rtol=1e-6)


def test_label_mix_weights_divide_by_the_public_sets_own_mix():
    """On an unbalanced public set (FEMNIST's follows the writers' skew to the digits) the
    weights are the ratio of the two mixes: a client whose labels follow the public mix
    weighs every row alike, and one class twice as common in the public set as in the
    client weighs half as much as the client's mix alone would say."""
    public = np.array([0] * 7 + [1] * 2 + [2])  # (8, 3, 2) / 13 add-one smoothed
    rows = np.eye(3, dtype=np.float32)[[0, 1, 2]]
    np.testing.assert_allclose(label_mix_weights(rows, public, public, 3), 1.0, rtol=1e-6)
    client = np.array([0] * 3 + [1] * 4 + [2] * 3)  # (4, 5, 4) / 13
    expected = np.array([4 / 8, 5 / 3, 4 / 2])
    np.testing.assert_allclose(label_mix_weights(rows, client, public, 3), expected / expected.mean(), rtol=1e-6)


def test_label_mix_weights_keep_a_skewed_client_from_learning_the_public_balance():
    """Distilling toward the public labels at full confidence (a client that copies them)
    teaches a label-skewed client to name every class as often as the balanced public
    rows do; with its rows weighted by the client's own label mix it keeps more of its
    personalized accuracy."""
    data, model = _trained_client()
    ref = data.reference
    copied = np.eye(data.splits.num_classes, dtype=np.float32)[ref.y]
    results = {}
    for weighted in (False, True):
        copy = build_model("cnn", data.splits.spec, seed=0)
        copy.load_state_dict(model.state_dict())
        distill(copy, ref.x, copied, epochs=3, batch_size=32, optim=OPT, device=CPU, seed=1,
                temperature=1.0, kl_weight=1.0,
                row_weights=label_mix_weights(copied, data.train.y, ref.y, data.splits.num_classes) if weighted else None)
        results[weighted] = _personal_acc(data, copy)
    assert results[True] > results[False] + 0.02, results


def test_distill_is_deterministic_for_a_seed():
    data, model = _trained_client()
    ref = data.reference
    targets = np.full((len(ref.y), data.splits.num_classes), 0.1, np.float32)
    losses = []
    for _ in range(2):
        copy = build_model("cnn", data.splits.spec, seed=0)
        copy.load_state_dict(model.state_dict())
        losses.append(
            distill(
                copy, ref.x, targets, epochs=1, batch_size=32, optim=OPT, device=CPU, seed=3,
                temperature=3.0, kl_weight=1.0, private=(data.train.x, data.train.y),
                private_weight=1.0,
            )
        )
    assert losses[0] == losses[1]


def test_private_schedule_one_pass_per_epoch():
    from kta_flwr.task.training import _private_schedule  # pylint: disable=import-outside-toplevel

    chunks = _private_schedule(num_private=50, num_reference=300, batch_size=32, epochs=2, seed=0)
    assert len(chunks) == 2 * 10  # ceil(300 / 32) reference batches per epoch
    for epoch in (chunks[:10], chunks[10:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(50))
    few = _private_schedule(num_private=3, num_reference=300, batch_size=32, epochs=1, seed=0)
    assert len(few) == 10 and all(len(c) == 1 for c in few)  # cycles through 3 samples


def test_distill_clip_bounds_every_step():
    """Plain SGD (no momentum, no decay) with the gradient clipped to norm c moves the
    weights by at most lr * c per step; unclipped, the same run moves them far more."""
    data = load_client_data(RunConfig(), partition_id=0, num_partitions=2)
    ref = data.reference
    wrong = np.zeros((len(ref.y), data.splits.num_classes), np.float32)
    wrong[:, 0] = 1.0
    sgd = Optim(lr=0.5, momentum=0.0, weight_decay=0.0)
    moved = {}
    for clip in (0.0, 0.01):
        model = build_model("cnn", data.splits.spec, seed=0)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        distill(model, ref.x, wrong, epochs=1, batch_size=len(ref.y), optim=sgd, device=CPU,
                seed=0, temperature=3.0, kl_weight=1.0, max_grad_norm=clip)
        end = torch.cat([p.detach().flatten() for p in model.parameters()])
        moved[clip] = float((end - start).norm())
    assert moved[0.01] <= 0.5 * 0.01 * 1.0001  # one full-batch step
    assert moved[0.0] > 10 * moved[0.01]


def test_shifts_and_flips_move_each_image_by_its_own_seeded_offset():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5) + 1  # no zeros
    shifted = shifts_and_flips(seed=4, max_shift=1, flip=False)(images)
    assert shifted.shape == images.shape
    assert torch.equal(shifted, shifts_and_flips(seed=4, max_shift=1, flip=False)(images))  # seeded
    for image, out in zip(images, shifted):
        # a shift by (dy, dx) in [-1, 1]^2: the image found again inside the zero-filled frame
        found = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                 if torch.equal(out, torch.roll(image, (dy, dx), (1, 2)) * _frame(dy, dx))]
        assert len(found) == 1
    batch = torch.rand(64, 1, 4, 4) + 1
    moved = shifts_and_flips(seed=0, max_shift=1, flip=False)(batch)
    assert len({tuple((moved[i] == 0).flatten().tolist()) for i in range(64)}) > 3  # offsets differ
    flipped = shifts_and_flips(seed=0, max_shift=0, flip=True)(batch)  # no shift: flips alone
    mirrored = [bool(torch.equal(f, b.flip(-1))) for f, b in zip(flipped, batch)]
    assert 10 < sum(mirrored) < 54
    assert all(m or torch.equal(f, b) for m, f, b in zip(mirrored, flipped, batch))


def _frame(dy: int, dx: int) -> torch.Tensor:
    """``[5, 5]`` ones but the row and column a shift by (dy, dx) filled with zeros."""
    mask = torch.ones(5, 5)
    if dy:
        mask[0 if dy > 0 else -1] = 0
    if dx:
        mask[:, 0 if dx > 0 else -1] = 0
    return mask


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("strategy", ["kta", "fedavg", "sapef", "ditto"])  # one per family
def test_lr_decay_scales_every_client_learning_rate_by_the_round(tmp_path, strategy):
    """``lr-decay`` = d: in round r both stages' SGD runs at lr x d ** (r - 1); 1 keeps it."""
    from kta_flwr.client.node import Node  # pylint: disable=import-outside-toplevel

    for decay, server_round, expected in ((0.5, 1, 0.05), (0.5, 3, 0.0125), (1.0, 7, 0.05)):
        fake = FakeNode(tmp_path / f"{decay}-{server_round}", strategy, lr_decay=decay)
        node = Node(fake.message("train", server_round), fake.context)
        assert node.optim(0.05).lr == pytest.approx(expected)
        model = torch.nn.Linear(2, 2)
        assert node.optim(0.05).build(model).param_groups[0]["lr"] == pytest.approx(expected)


def _stem_statistics_match(model: torch.nn.Module, x: np.ndarray) -> bool:
    """Whether a resnet8's stem BatchNorm holds the mean of its stem's outputs on ``x``."""
    with torch.no_grad():
        expected = model[0](torch.as_tensor(x)).mean(dim=(0, 2, 3))
    return torch.allclose(model[1].running_mean, expected, atol=1e-5)


def test_batch_norm_recalibration_recomputes_the_running_statistics_on_the_given_inputs():
    data = load_client_data(RunConfig(), partition_id=0, num_partitions=2)
    x, y = data.train.x[:256], data.train.y[:256]  # 8 equal batches: the mean of batch means is the mean
    trained = {}
    for recalibrate in (False, True):
        model = build_model("resnet8", data.splits.spec, seed=0)
        train_supervised(model, x, y, epochs=2, batch_size=32, optim=OPT, device=CPU, seed=0,
                         recalibrate=recalibrate)
        trained[recalibrate] = {k: v.clone() for k, v in model.state_dict().items()}
    assert _stem_statistics_match(model, x)
    # same weights either way; only the statistics differ, and recalibrating again changes nothing
    weights = [k for k in trained[True] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(trained[True][k], trained[False][k]) for k in weights)
    assert not torch.allclose(trained[True]["1.running_mean"], trained[False]["1.running_mean"])
    assert recalibrate_batch_norm(model, x, 32, CPU)
    assert torch.allclose(model[1].running_mean, trained[True]["1.running_mean"], atol=1e-6)
    plain = build_model("cnn", data.splits.spec, seed=0)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    assert not recalibrate_batch_norm(plain, x, 32, CPU)  # no BatchNorm: nothing to do
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_batch_norm_recalibration_is_on_by_default_and_off_for_runs_saved_before_it():
    assert parse_run_config({}).bn_recalibrate
    assert not parse_run_config(stored_run_config({"strategy": "kta"})).bn_recalibrate
    assert not parse_run_config({"bn-recalibrate": False}).bn_recalibrate


@pytest.mark.parametrize("trainer", ["distill-private", "distill-reference", "mutual-distill", "prototypes"])
def test_every_training_pass_recalibrates_on_the_inputs_its_model_serves(trainer):
    """Stage 2 (market: on the private inputs it is given, else on the reference rows),
    FedKD's mutual distillation (teacher and student) and FedProto's objective each end
    with BatchNorm statistics of their final weights; off, they keep the running averages."""
    data = load_client_data(RunConfig(), partition_id=0, num_partitions=2)
    x, y = data.train.x[:96], data.train.y[:96]  # 3 equal batches: the mean of batch means is the mean
    x_ref = data.reference.x[:96]
    spec, c = data.splits.spec, data.splits.num_classes
    targets = np.full((len(x_ref), c), 1.0 / c, np.float32)
    common = {"epochs": 1, "batch_size": 32, "optim": OPT, "device": CPU, "seed": 0}
    for recalibrate in (False, True):
        models = [build_model("resnet8", spec, seed=0)]
        if trainer == "distill-private":
            distill(models[0], x_ref, targets, temperature=1.0, kl_weight=1.0, private=(x, y),
                    private_weight=1.0, recalibrate=recalibrate, **common)
        elif trainer == "distill-reference":
            distill(models[0], x_ref, targets, temperature=1.0, kl_weight=1.0, recalibrate=recalibrate, **common)
        elif trainer == "mutual-distill":
            models.append(build_model("resnet8", spec, seed=1))
            mutual_distill(*models, x, y, recalibrate=recalibrate, **common)
        else:
            train_with_prototypes(models[0], x, y, num_classes=c, prototypes=None, classes=None, weight=1.0,
                                  projection=None, recalibrate=recalibrate, **common)
        served = x_ref if trainer == "distill-reference" else x
        assert all(_stem_statistics_match(model, served) == recalibrate for model in models), recalibrate
