"""The CUDA path, on a GPU: the market's torch kernels equal the numpy ones, and a client's
training, distillation, DP-SGD and evaluation run on the device and learn as on the CPU.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest -q --noconftest tests/test_cuda.py``: it needs neither flwr nor the
shared datasets (scikit-learn's bundled digits), so a bare PyTorch image can run it.
Without a GPU, ``tests/test_market_scale.py`` checks that ``cuda`` fails fast.
"""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from kta_flwr.maths.market import FAST, MarketParams, run_market
from kta_flwr.task.market_torch import market_kernels
from kta_flwr.task.models import ModelSpec, build_model
from kta_flwr.task.privacy import PrivateTraining
from kta_flwr.task.training import Optim, distill, evaluate, predict_logits, resolve_device, train_supervised

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
OPT = Optim(lr=0.05, momentum=0.9)


def _digits():
    """Digits as ``[M, 1, 8, 8]`` float32 images in [0, 1]: 1,200 to train on, the rest
    to test on, and their spec."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    return (x[:1200], y[:1200]), (x[1200:], y[1200:]), ModelSpec((1, 8, 8), 10)


def test_auto_and_market_device_pick_the_gpu():
    assert resolve_device("auto").type == "cuda" and resolve_device("cuda").type == "cuda"
    assert market_kernels("auto") is not FAST and market_kernels("cuda") is not FAST


@pytest.mark.parametrize("params", [
    MarketParams(temperature=3.0, teacher_quality="likelihood", sybil_divergence=1e-5, loudness_cap=2.0,
                 target_space="logit", self_weight=0.0),
    MarketParams(temperature=3.0, consistency=True, neighbours=3, target_space="logit", background=True),
    MarketParams(adaptive=False, tau=0.05, divergence="hellinger"),
], ids=["kta", "top-3 background", "fixed hellinger"])
def test_the_market_on_the_gpu_equals_the_numpy_market(params):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    logits = rng.normal(0, 2, (12, 200, 10)).astype(np.float32)
    logits[:, np.arange(200), labels] += rng.uniform(0, 5, (12, 1)).astype(np.float32)
    held_out = np.zeros(200, bool)
    held_out[::5] = True
    cpu = run_market(logits, labels, params, held_out, kernels=FAST, target_rows=~held_out)
    gpu = run_market(logits, labels, params, held_out, kernels=market_kernels("cuda"), target_rows=~held_out)
    np.testing.assert_array_equal(gpu.tau, cpu.tau)
    np.testing.assert_array_equal(gpu.distill, cpu.distill)
    np.testing.assert_allclose(gpu.divergence, cpu.divergence, atol=1e-6)
    np.testing.assert_allclose(gpu.weights, cpu.weights, atol=1e-6)
    np.testing.assert_allclose(gpu.targets, cpu.targets, atol=1e-5)


def test_a_client_trains_distills_and_evaluates_on_the_gpu_as_on_the_cpu():
    (x, y), (x_test, y_test), spec = _digits()
    mix = np.bincount(y_test, minlength=10) / len(y_test)
    accuracy = {}
    for device in (CPU, CUDA):
        model = build_model("cnn", spec, seed=0)
        loss = train_supervised(model, x, y, epochs=3, batch_size=32, optim=OPT, device=device, seed=0)
        assert np.isfinite(loss)
        assert all(p.device.type == device.type for p in model.parameters())
        teacher = predict_logits(model, x[:300], device)
        assert teacher.dtype == np.float32 and teacher.shape == (300, 10) and np.isfinite(teacher).all()
        targets = torch.softmax(torch.from_numpy(teacher) / 3.0, -1).numpy()
        loss = distill(model, x[:300], targets, epochs=1, batch_size=32, optim=OPT, device=device, seed=1,
                       temperature=3.0, kl_weight=1.0, y_ref=y[:300], ce_weight=1.0,
                       private=(x, y), private_weight=1.0)
        assert np.isfinite(loss)
        accuracy[device.type] = evaluate(model, x_test, y_test, mix, device).accuracy
    assert accuracy["cuda"] > 0.85  # it learnt (bf16 autocast on the GPU: not bit-equal)
    assert abs(accuracy["cuda"] - accuracy["cpu"]) < 0.05, accuracy


def test_dp_sgd_runs_on_the_gpu_and_spends_what_it_spends_on_the_cpu():
    (x, y), _, spec = _digits()
    spent = {}
    for device in (CPU, CUDA):
        model = build_model("cnn", spec, seed=0, private=True)
        before = [p.detach().cpu().clone() for p in model.parameters()]
        private = PrivateTraining(noise_multiplier=1.0, clip=1.0, seed=0)
        loss = train_supervised(model, x, y, epochs=1, batch_size=64, optim=OPT, device=device, seed=0,
                                dp=private)
        assert np.isfinite(loss)
        assert any(not torch.equal(b, p.detach().cpu()) for b, p in zip(before, model.parameters()))
        spent[device.type] = private.spent
    assert spent["cuda"] == spent["cpu"]  # the accountant's input does not depend on the device
