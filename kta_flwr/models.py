"""Model registry: name -> builder ``(input_shape, num_classes) -> nn.Module``.

Under the market strategies each client may run a different architecture (run-config
``models = "mlp,cnn"`` assigns them round-robin by partition id): only predictions on
the reference set are exchanged, never weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 512) -> nn.Module:
    """Perceptron with two hidden layers on flattened inputs (~300k parameters on 8x8)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv layers and one 2x2 max-pool; for small images such as 8x8 digits."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 2) * (width // 2), num_classes),
    )


#: Model name -> builder.
MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": mlp,
    "cnn": small_cnn,
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build model ``name`` with weights initialised from ``seed`` (deterministic)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](input_shape, num_classes)


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
