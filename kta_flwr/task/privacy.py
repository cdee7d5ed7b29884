"""Example-level differential privacy for a client's training: DP-SGD through Opacus
(per-sample clipping, Gaussian noise, Poisson-sampled batches) and its accountant.

A training call that touches private data under DP runs :func:`dp_sgd`: each step draws
a Poisson sample of the private rows (each row independently with probability
``sample_rate``, the sampling Opacus' accountant assumes), clips every row's gradient to
L2 norm ``clip``, adds ``N(0, (noise_multiplier * clip)²)`` to their sum and divides by
the expected batch size (Opacus' ``GradSampleModule`` and ``DPOptimizer``). Terms that do
not read private rows (the distillation loss on the public reference set, a proximal
term) are differentiated without clipping or noise and added afterwards: the update is a
function of a DP gradient and of public data, so it stays DP (post-processing).

Each call records a :class:`Spend` ``(noise_multiplier, sample_rate, steps)``; Opacus'
RDP accountant composes them (:func:`epsilon_spent`); :func:`noise_for_target` finds the
smallest noise multiplier whose planned spends stay within a target ε.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

#: Opacus' own bound on the searched noise multiplier.
MAX_NOISE_MULTIPLIER = 2000.0


@dataclass(frozen=True)
class Spend:
    """One DP training call's use of the private data: ``steps`` Poisson-sampled steps at
    ``sample_rate`` with noise ``noise_multiplier`` (std / clip)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class PrivateTraining:
    """DP-SGD settings of a client's training calls, and what they spent (appended by
    each call)."""

    noise_multiplier: float  # noise std / clip
    clip: float  # per-sample gradient L2 norm bound
    seed: int = 0  # the noise generator's seed (per call: seed + the calls before)
    spent: list[Spend] = field(default_factory=list)


def epsilon_spent(spends: Iterable[Spend], delta: float) -> float:
    """ε of ``spends`` composed at ``delta`` by Opacus' RDP accountant (0.0 for none;
    ``inf`` when a spend had no noise)."""
    from opacus.accountants import RDPAccountant  # pylint: disable=import-outside-toplevel

    steps: dict[tuple[float, float], int] = {}
    for spend in spends:  # RDP adds up: calls at the same noise and rate merge exactly
        key = (spend.noise_multiplier, spend.sample_rate)
        steps[key] = steps.get(key, 0) + spend.steps
    history = [(sigma, rate, count) for (sigma, rate), count in steps.items() if count > 0]
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return float("inf")
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta=delta))


def noise_for_target(
    epsilon: float, delta: float, plan: Sequence[tuple[float, int]], tolerance: float = 0.01
) -> float:
    """The smallest noise multiplier (within ``tolerance`` in ε) at which the planned
    calls ``plan`` (``(sample_rate, steps)`` each) spend at most ``epsilon`` at ``delta``.

    Raises:
        ValueError: ``epsilon`` or ``delta`` out of range, or a budget too small for any
            noise up to :data:`MAX_NOISE_MULTIPLIER`.
    """
    if not epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")

    def spent(sigma: float) -> float:
        return epsilon_spent((Spend(sigma, q, steps) for q, steps in plan), delta)

    low, high = 0.0, 1.0
    while spent(high) > epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"epsilon {epsilon} at delta {delta} is too small a budget for "
                             f"{sum(s for _, s in plan)} steps")
    while high - low > 1e-4 and epsilon - spent(high) > tolerance:
        middle = (low + high) / 2
        if spent(middle) > epsilon:
            low = middle
        else:
            high = middle
    return high


def private_compatible(model: nn.Module, name: str) -> nn.Module:
    """``model`` with the layers Opacus cannot train per sample replaced by its
    validator (BatchNorm becomes GroupNorm), in-place activations made out-of-place and
    ResNet blocks' last norm output copied before the residual add (the same values;
    Opacus' hooks need it). Layers without a per-sample rule of their own
    are differentiated per sample by functorch; a trainable layer with buffers is refused.

    Raises:
        ValueError: naming the model and what Opacus still refuses.
    """
    # pylint: disable=import-outside-toplevel
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    if not ModuleValidator.is_valid(model):
        model = ModuleValidator.fix(model)
    for module in model.modules():  # in-place activations break Opacus' backward hooks
        if getattr(module, "inplace", False):
            module.inplace = False
        _copy_before_residual(module)
    errors = ModuleValidator.validate(model, strict=False) + GradSampleModule.validate(model)
    if errors:
        raise ValueError(f"model {name!r} cannot be trained with DP-SGD (Opacus): {errors[0]}")
    return model


class _Copy(nn.Module):
    """The input, copied: a hooked layer's output that its parent then adds to in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.clone()


def _copy_before_residual(module: nn.Module) -> None:
    """torchvision's ResNet blocks add the shortcut into their last norm's output in place
    (``out += identity``), which autograd forbids on the output of a hooked layer: that
    norm's output is copied first (``bn2`` -> ``Sequential(bn2, _Copy())``; same values)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck  # pylint: disable=import-outside-toplevel

    last = {BasicBlock: "bn2", Bottleneck: "bn3"}.get(type(module))
    if last is not None and not isinstance(getattr(module, last), nn.Sequential):
        setattr(module, last, nn.Sequential(getattr(module, last), _Copy()))


def poisson_sample(size: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the rows (of ``size``) a Poisson draw at ``sample_rate`` keeps: each row
    independently; possibly none."""
    return torch.nonzero(torch.rand(size, generator=generator) < sample_rate).flatten()


def dp_sgd(  # pylint: disable=too-many-arguments,too-many-locals
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    private_loss: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    private_size: int,
    sample_rate: float,
    steps: int,
    private: PrivateTraining,
    device: torch.device,
    seed: int,
    public_loss: Callable[[nn.Module], torch.Tensor | None] | None = None,
    max_grad_norm: float = 0.0,
) -> float:
    """``steps`` DP-SGD steps of ``model``; returns the mean loss and appends the
    :class:`Spend` to ``private.spent``.

    Args:
        private_loss: ``(module, idx) -> mean loss`` of the private rows ``idx`` (a device
            tensor, possibly empty); ``module`` is the wrapped model to call.
        private_size: rows of the private data; sample_rate: each row's chance per step.
        public_loss: ``module -> loss`` of the step's terms that read no private row
            (called once per step, before the private term; None: none).
        max_grad_norm: clip the combined gradient's L2 norm (0: no clip), after the noise.
    """
    # pylint: disable=import-outside-toplevel
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    wrapped = GradSampleModule(model, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    noise = torch.Generator(device=device).manual_seed(private.seed + len(private.spent))
    dp_optimizer = DPOptimizer(
        optimizer, noise_multiplier=private.noise_multiplier, max_grad_norm=private.clip,
        expected_batch_size=max(sample_rate * private_size, 1e-12), loss_reduction="mean",
        generator=noise,
    )
    rows = torch.Generator().manual_seed(seed)
    total = 0.0
    with warnings.catch_warnings():
        # Opacus' hooks on a first layer whose input needs no gradient: expected, harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            for _ in range(steps):
                dp_optimizer.zero_grad(set_to_none=True)
                public = None
                if public_loss is not None:
                    wrapped.disable_hooks()
                    public = public_loss(wrapped)
                    if public is not None:
                        public.backward()
                    wrapped.enable_hooks()
                public_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
                for p in params:
                    p.grad = None
                idx = poisson_sample(private_size, sample_rate, rows).to(device)
                loss = private_loss(wrapped, idx)
                loss.backward()
                dp_optimizer.pre_step()  # p.grad: the clipped, noised, averaged private gradient
                for p, grad in zip(params, public_grads):
                    if grad is not None:
                        p.grad += grad
                if max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(params, max_grad_norm)
                dp_optimizer.original_optimizer.step()
                total += float(loss.detach()) + (0.0 if public is None else float(public.detach()))
        finally:
            wrapped.zero_grad(set_to_none=True)
            wrapped._close()  # pylint: disable=protected-access  # hooks off, grad samples gone
    private.spent.append(Spend(private.noise_multiplier, sample_rate, steps))
    return total / max(1, steps)
