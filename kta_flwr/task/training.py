"""Client-side torch routines: supervised training, distillation, prediction, evaluation.

Data lives in memory as tensors on the training device; mini-batches are index slices
drawn from a seeded generator, so a (seed, round, partition) triple fixes a run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from kta_flwr.maths.update_compression import ParamLayout
from kta_flwr.task.models import classifier_of
from kta_flwr.task.privacy import PrivateTraining, dp_sgd


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run-config 'device' = 'cuda' but no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class Optim:
    """SGD settings shared by both stages."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """A fresh SGD optimizer over ``model``'s trainable parameters."""
        return torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
        )


def _batches(size: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(size, generator=generator)
    for start in range(0, size, batch_size):
        yield order[start : start + batch_size]


def _as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor: one pinned, non-blocking copy per call on CUDA, and
    image batches (``[M, C, H, W]``) in channels-last layout there."""
    tensor = torch.as_tensor(array)
    if device.type != "cuda":
        return tensor
    tensor = tensor.pin_memory().to(device, non_blocking=True)
    if tensor.ndim == 4 and tensor.is_floating_point():
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def _prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` (channels-last on CUDA, where convolutions prefer it)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (faster matmuls/convs, fp32 master weights); off on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, x: np.ndarray, batch_size: int, device: torch.device) -> bool:
    """Recompute the running mean and variance of ``model``'s BatchNorm layers on the
    inputs ``x`` (``[n, *input_shape]``) with its current weights: one forward pass in
    batches of ``batch_size``, each batch weighing the same
    (:func:`torch.optim.swa_utils.update_bn`). Training leaves running averages gathered
    under weights that kept moving, and evaluation reads them: a ResNet-8 trained on a
    FEMNIST client scored 0.09 on its test rows with them and 0.67 recalibrated.

    Returns:
        Whether the model has a BatchNorm layer (nothing is done without one, or without
        rows).
    """
    if len(x) == 0 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    xs = _as_tensor(x, device)
    update_bn(torch.split(xs, batch_size), _prepare(model, device))
    return True


def _fit(  # pylint: disable=too-many-arguments
    model: nn.Module,
    size: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    epochs: int,
    batch_size: int,
    optim: Optim,
    device: torch.device,
    seed: int,
    max_grad_norm: float = 0.0,
) -> float:
    """SGD over ``epochs`` shuffled passes of ``size`` samples; returns the mean loss.

    ``batch_loss(idx)`` computes the loss of the samples ``idx`` (a device tensor). The
    running loss stays on the device: no host sync per batch. ``max_grad_norm`` > 0 clips
    the gradient's global L2 norm before each step.
    """
    _prepare(model, device).train()
    optimizer = optim.build(model)
    generator = torch.Generator().manual_seed(seed)
    total, steps = torch.zeros((), device=device), 0
    for _ in range(epochs):
        for idx in _batches(size, batch_size, generator):
            with _autocast(device):
                loss = batch_loss(idx.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            total += loss.detach()
            steps += 1
    return float(total) / steps


def train_supervised(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optim: Optim,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    proximal_to: nn.Module | None = None,
    dp: PrivateTraining | None = None,
    recalibrate: bool = True,
) -> float:
    """Stage 1: cross-entropy on private data, plus ``mu/2 * ||w - w0||^2`` if ``mu > 0``.

    ``w0`` is ``proximal_to``'s weights (Ditto's global model for the personal one), by
    default the model's weights on entry (the global model under FedProx). Parameters with
    ``requires_grad`` off stay fixed (FedRep trains head and body in turn).

    With ``dp``, DP-SGD (:func:`kta_flwr.task.privacy.dp_sgd`): ``epochs`` times
    ``ceil(n / batch_size)`` steps on Poisson samples at rate ``batch_size / n``; the
    proximal term reads no private row and is added unclipped.

    With ``recalibrate`` (and without ``dp``), BatchNorm's running statistics are then
    recomputed on ``x`` (:func:`recalibrate_batch_norm`).

    Returns:
        Mean training loss over all batches (0.0 if there is no data).
    """
    if len(y) == 0 or epochs == 0:
        return 0.0
    xs, ys = _as_tensor(x, device), _as_tensor(y, device)
    anchor = []
    if proximal_mu > 0:
        source = model if proximal_to is None else proximal_to
        anchor = [p.detach().to(device).clone() for p in source.parameters()]

    def proximal() -> torch.Tensor:
        drift = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
        return 0.5 * proximal_mu * drift

    if dp is not None:
        _prepare(model, device).train()
        return dp_sgd(
            model, optim.build(model), private_loss=lambda module, idx: _mean_ce(module, xs, ys, idx),
            private_size=len(ys), sample_rate=min(1.0, batch_size / len(ys)),
            steps=epochs * -(-len(ys) // batch_size), private=dp, device=device, seed=seed,
            public_loss=(lambda module: proximal()) if anchor else None,
        )

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        if anchor:
            loss = loss + proximal()
        return loss

    mean_loss = _fit(model, len(ys), batch_loss, epochs, batch_size, optim, device, seed)
    if recalibrate:
        recalibrate_batch_norm(model, x, batch_size, device)
    return mean_loss


def _mean_ce(module: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the rows ``idx`` (0 for none: a Poisson sample may be empty)."""
    return F.cross_entropy(module(x[idx]), y[idx], reduction="sum") / max(1, len(idx))


def distill(
    model: nn.Module,
    x_ref: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optim: Optim,
    device: torch.device,
    seed: int,
    temperature: float,
    kl_weight: float,
    y_ref: np.ndarray | None = None,
    ce_weight: float = 0.0,
    private: tuple[np.ndarray, np.ndarray] | None = None,
    private_weight: float = 0.0,
    max_grad_norm: float = 0.0,
    dp: PrivateTraining | None = None,
    private_rate: float = 0.0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    row_weights: np.ndarray | None = None,
    recalibrate: bool = True,
) -> float:
    """Stage 2: distill toward personalized soft targets on the reference set.

    Loss per batch: ``kl_weight * T^2 * KL(q || softmax(f(x) / T))``
    ``+ ce_weight * CE(f(x), y_ref) + private_weight * CE(f(x_priv), y_priv)``, where the
    last term takes the next slice of the client's private data (one pass per epoch, see
    :func:`_private_schedule`), so the distillation step minimises the market objective
    (local CE + KL) instead of forgetting the private data.

    Args:
        x_ref: ``[N, *input_shape]`` reference inputs.
        targets: ``[N, C]`` soft targets ``q`` (rows sum to 1).
        y_ref: ``[N]`` reference labels, used only when ``ce_weight > 0``; rows labelled
            -1 (unlabeled transfer rows) take no cross-entropy.
        private: the client's private ``(x, y)``, used only when ``private_weight > 0``.
        max_grad_norm: clip each step's gradient to this L2 norm (0: no clipping). The
            ``T^2``-scaled KL can take steps ``T`` times larger than cross-entropy's;
            without a clip some FEMNIST clients diverged to chance and never recovered.
        dp: DP-SGD for the private term (:func:`kta_flwr.task.privacy.dp_sgd`): each step
            draws a Poisson sample of the private rows at the rate that passes over them
            once per epoch (as :func:`_private_schedule` does without DP); the reference
            terms read no private row and are added unclipped. Without a private term
            stage 2 reads no private data and runs as without DP.
        private_rate: under ``dp``, the private term's Poisson rate (0: once over the
            private rows per epoch; a node passes its planned rate, so that its spend
            never exceeds the plan's).
        augment: applied to each batch of reference inputs (:func:`shifts_and_flips`);
            the rows keep their targets. None: the inputs as they are.
        row_weights: ``[N]`` non-negative weight of each row's KL term
            (:func:`label_mix_weights`); None: all 1.
        recalibrate: without ``dp``, recompute BatchNorm's running statistics afterwards
            on ``private``'s inputs (the data the model serves), or on ``x_ref`` without
            them (:func:`recalibrate_batch_norm`).

    Returns:
        Mean loss over all batches.
    """
    if epochs == 0:
        return 0.0
    xs, qs = _as_tensor(x_ref, device), _as_tensor(targets, device).float()
    ws = None if row_weights is None else _as_tensor(np.asarray(row_weights, np.float32), device)
    ys = _as_tensor(y_ref, device) if (y_ref is not None and ce_weight > 0) else None
    # unlabeled rows (transfer, label -1) take no cross-entropy; checked once, not per batch
    some_unlabeled = ys is not None and bool((ys < 0).any())
    use_private = private is not None and private_weight > 0 and len(private[1]) > 0
    if use_private:
        xp, yp = _as_tensor(private[0], device), _as_tensor(private[1], device)
        chunks = iter(_private_schedule(len(yp), len(qs), batch_size, epochs, seed + 7))

    def reference_loss(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        out = module(xs[idx] if augment is None else augment(xs[idx]))
        log_p = F.log_softmax(out / temperature, dim=-1)
        if ws is None:
            loss = kl_weight * temperature**2 * F.kl_div(log_p, qs[idx], reduction="batchmean")
        else:
            per_row = F.kl_div(log_p, qs[idx], reduction="none").sum(dim=-1)
            loss = kl_weight * temperature**2 * (ws[idx] * per_row).mean()
        if ys is not None:
            labels = ys[idx]
            if some_unlabeled and bool((labels < 0).any()):  # cross-entropy on the labeled rows
                loss = loss + ce_weight * F.cross_entropy(out, labels, ignore_index=-1, reduction="sum") / max(
                    1, int((labels >= 0).sum()))
            else:
                loss = loss + ce_weight * F.cross_entropy(out, labels)
        return loss

    if use_private and dp is not None:
        steps = -(-len(qs) // batch_size)
        generator = torch.Generator().manual_seed(seed)
        reference = (idx.to(device) for _ in range(epochs) for idx in _batches(len(qs), batch_size, generator))
        _prepare(model, device).train()
        return dp_sgd(
            model, optim.build(model),
            private_loss=lambda module, idx: private_weight * _mean_ce(module, xp, yp, idx),
            private_size=len(yp), sample_rate=private_rate or stage2_rate(len(yp), steps),
            steps=epochs * steps, private=dp, device=device, seed=seed + 7,
            public_loss=lambda module: reference_loss(module, next(reference)),
            max_grad_norm=max_grad_norm,
        )

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        loss = reference_loss(model, idx)
        if use_private:
            pick = next(chunks).to(device, non_blocking=True)
            loss = loss + private_weight * F.cross_entropy(model(xp[pick]), yp[pick])
        return loss

    mean_loss = _fit(model, len(qs), batch_loss, epochs, batch_size, optim, device, seed, max_grad_norm)
    if recalibrate and dp is None:  # a forward pass over private rows is outside DP's accounting
        served = private[0] if private is not None and len(private[0]) else x_ref
        recalibrate_batch_norm(model, served, batch_size, device)
    return mean_loss


def label_mix_weights(targets: np.ndarray, labels: np.ndarray, public_labels: np.ndarray | None,
                      num_classes: int) -> np.ndarray:
    """Importance weights of distillation rows for a client whose own data has the label
    mix of ``labels``, from public rows whose labels have the mix of ``public_labels``:
    row i weighs ``sum_c q[i, c] p(c) / r(c)`` (``p``, ``r``: the two label frequencies,
    add-one smoothed), scaled to mean 1; on a balanced public set, ``C sum_c q[i, c] p(c)``.
    Weighted so, stage 2 learns each class as often as the client's own (test) data holds
    it, and a target that names a class the client hardly holds, however confidently,
    pulls it little toward that class.

    Args:
        targets: ``[N, C]`` soft targets. labels: ``[n]`` the client's private labels.
        public_labels: ``[N_ref]`` the labels of the public reference set (all of it);
            None (no labels, ``reference-labels = none``): taken to be balanced.
        num_classes: C.

    Returns:
        ``[N]`` float32 weights, mean 1.
    """
    def frequencies(values: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.asarray(values, np.int64), minlength=num_classes)
        return (counts + 1.0) / (len(values) + num_classes)

    public = (np.full(num_classes, 1.0 / num_classes) if public_labels is None
              else frequencies(public_labels))
    weights = np.asarray(targets, np.float64) @ (frequencies(labels) / public)
    return (weights / max(weights.mean(), 1e-12)).astype(np.float32)


def shifts_and_flips(seed: int, max_shift: int, flip: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A seeded augmentation of image batches ``[B, C, H, W]``: each image shifted by up to
    ``max_shift`` pixels each way (zeros fill in; a random crop of the zero-padded image)
    and, with ``flip``, mirrored left-right with probability 1/2. Same shape and device."""
    generator = torch.Generator().manual_seed(seed)

    def apply(images: torch.Tensor) -> torch.Tensor:
        size, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        padded = F.pad(images, (max_shift,) * 4)
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2, size), generator=generator).tolist()
        out = torch.stack([padded[i, :, y:y + height, x:x + width] for i, (y, x) in enumerate(zip(dy, dx))])
        if flip:
            mirrored = (torch.rand(size, generator=generator) < 0.5).to(images.device)
            out = torch.where(mirrored[:, None, None, None], out.flip(-1), out)
        return out

    return apply


def stage2_rate(num_private: int, steps_per_epoch: int) -> float:
    """DP stage 2's Poisson rate for the private term: one pass over the ``num_private``
    rows per ``steps_per_epoch`` steps (at least one row per step, as
    :func:`_private_schedule`)."""
    return min(1.0, max(1.0 / steps_per_epoch, 1.0 / num_private))


def mutual_distill(  # pylint: disable=too-many-arguments
    teacher: nn.Module,
    student: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optim: Optim,
    device: torch.device,
    seed: int,
    recalibrate: bool = True,
) -> float:
    """FedKD's adaptive mutual distillation (Wu et al. 2022) on private data.

    Per batch: ``CE_t + CE_s + (KL(p_s || p_t) + KL(p_t || p_s)) / (CE_t + CE_s)``, each KL
    term moving only the model it distils into (the other side detached): the better both
    models fit the labels, the more they learn from each other. (FedKD's hidden-state
    losses are left out: teacher and student may have unrelated architectures.) With
    ``recalibrate``, both models' BatchNorm statistics are then recomputed on ``x``.

    Returns:
        Mean loss over all batches (0.0 if there is no data).
    """
    if len(y) == 0 or epochs == 0:
        return 0.0
    xs, ys = _as_tensor(x, device), _as_tensor(y, device)
    pair = nn.ModuleList([teacher, student])

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        out_t, out_s = teacher(xs[idx]), student(xs[idx])
        ce_t, ce_s = F.cross_entropy(out_t, ys[idx]), F.cross_entropy(out_s, ys[idx])
        log_t, log_s = F.log_softmax(out_t, -1), F.log_softmax(out_s, -1)
        kd_t = F.kl_div(log_t, log_s.detach(), log_target=True, reduction="batchmean")
        kd_s = F.kl_div(log_s, log_t.detach(), log_target=True, reduction="batchmean")
        return ce_t + ce_s + (kd_t + kd_s) / (ce_t + ce_s).detach()

    mean_loss = _fit(pair, len(ys), batch_loss, epochs, batch_size, optim, device, seed)
    if recalibrate:
        for model in pair:
            recalibrate_batch_norm(model, x, batch_size, device)
    return mean_loss


def model_vector(model: nn.Module, layout: ParamLayout) -> np.ndarray:
    """``model``'s floating-point state in ``layout`` order: float32 ``[P]`` on the host."""
    return layout.flatten(model.state_dict())


def load_vector(model: nn.Module, layout: ParamLayout, vector: np.ndarray) -> nn.Module:
    """Set ``model``'s floating-point state from a ``[P]`` vector (other entries kept)."""
    values = {k: torch.from_numpy(np.array(v)) for k, v in layout.unflatten(vector).items()}
    model.load_state_dict({**model.state_dict(), **values})
    return model


def _private_schedule(
    num_private: int, num_reference: int, batch_size: int, epochs: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """Private-sample indices to pair with each stage-2 reference batch.

    Every stage-2 epoch passes over the private data exactly once, spread evenly over that
    epoch's reference batches (so a client with little data is not over-trained, and
    stage 2 costs ``distill-epochs`` private epochs, like extra local epochs would).
    """
    steps = -(-num_reference // batch_size)
    generator = torch.Generator().manual_seed(seed)
    chunks: list[torch.Tensor] = []
    for _ in range(epochs):
        order = torch.randperm(num_private, generator=generator)
        if num_private < steps:  # fewer samples than batches: cycle through them
            order = order.repeat(-(-steps // num_private))[:steps]
        chunks.extend(torch.tensor_split(order, steps))
    return tuple(chunks)


def training_samples(
    num_private: int, num_reference: int, *, local_epochs: int, distill_epochs: int,
    batch_size: int, private_weight: float, distilled: bool,
) -> int:
    """Samples passed forward and backward by one client round (stage 1, plus stage 2 when
    ``distilled``), counted exactly as :func:`train_supervised` and :func:`distill` draw them."""
    total = local_epochs * num_private if num_private else 0
    if distilled and distill_epochs:
        total += distill_epochs * num_reference
        if private_weight > 0 and num_private:
            steps = -(-num_reference // batch_size)
            total += distill_epochs * max(num_private, steps)
    return total


def inference_batch_size(device: torch.device) -> int:
    """Batch size for forward-only passes: large on a GPU; 256 on a CPU, where bigger
    batches fall out of cache (a FEMNIST CNN ran 1.5x faster at 256 than at 1,024 on
    2 cores)."""
    return 1024 if device.type == "cuda" else 256


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int | None = None
) -> np.ndarray:
    """Logits ``[M, C]`` (float32, on the host) of ``model`` in eval mode, computed in
    batches of ``batch_size`` (default :func:`inference_batch_size`)."""
    batch_size = batch_size or inference_batch_size(device)
    _prepare(model, device).eval()
    xs = _as_tensor(x, device)
    with _autocast(device):
        out = torch.cat([model(xs[s : s + batch_size]) for s in range(0, len(xs), batch_size)])
    return out.float().cpu().numpy()


@dataclass(frozen=True)
class Evaluation:
    """Accuracy of one model on a labeled set."""

    accuracy: float  # plain top-1 accuracy on the set
    personalized_accuracy: float  # sum_c pi_c * acc_c with pi the client's label mix
    per_class: np.ndarray  # [C] accuracy per class (nan where the set has none)
    loss: float  # mean cross-entropy


def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    label_distribution: np.ndarray,
    device: torch.device,
) -> Evaluation:
    """Global and personalized accuracy of ``model`` on ``(x, y)``.

    The personalized accuracy re-weights the per-class accuracy by the client's own label
    distribution ``pi`` (``[C]``, sums to 1): the expected accuracy on a test set drawn
    with the client's label mix, estimated from every test sample.
    """
    logits = torch.from_numpy(predict_logits(model, x, device))
    labels = torch.from_numpy(np.asarray(y))
    loss = float(F.cross_entropy(logits, labels))
    correct = (logits.argmax(-1) == labels).numpy()
    num_classes = len(label_distribution)
    hits = np.bincount(y, weights=correct, minlength=num_classes)
    counts = np.bincount(y, minlength=num_classes)
    per_class = np.divide(hits, counts, out=np.full(num_classes, np.nan), where=counts > 0)
    mix = np.where(counts > 0, label_distribution, 0.0)
    personalized = float(np.nansum(per_class * mix) / max(mix.sum(), 1e-12))
    return Evaluation(float(correct.mean()), personalized, per_class, loss)


def embedding_projection(in_features: int, dim: int, seed: int) -> torch.Tensor | None:
    """FedProto across widths: a fixed ``[in_features, dim]`` Gaussian projection with
    entries of variance ``1 / dim`` (norms kept in expectation), drawn from ``seed`` and
    the width alike on every client of that width; None (the identity) when the sizes agree."""
    if in_features == dim:
        return None
    generator = torch.Generator().manual_seed(seed * 7919 + in_features)
    return torch.randn(in_features, dim, generator=generator) / dim**0.5


def _logits_and_embedding(model: nn.Module, x: torch.Tensor,
                          projection: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` and the classifier's input (``[B, d]`` after ``projection``)."""
    seen: list[torch.Tensor] = []
    handle = classifier_of(model).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    embedding = seen[0].flatten(1)
    return logits, embedding if projection is None else embedding @ projection.to(embedding.device)


def train_with_prototypes(  # pylint: disable=too-many-arguments
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, num_classes: int,
    prototypes: np.ndarray | None, classes: np.ndarray | None, weight: float,
    projection: torch.Tensor | None, epochs: int, batch_size: int, optim: Optim,
    device: torch.device, seed: int, recalibrate: bool = True,
) -> float:
    """FedProto's local objective: cross-entropy plus ``weight`` times the mean squared
    distance of each row's (projected) embedding to its class's global prototype
    (``prototypes`` ``[m, d]`` of ``classes`` ``[m]`` in ``[0, num_classes)``; rows of
    other classes, or no prototypes yet: cross-entropy only); with ``recalibrate``,
    BatchNorm's statistics are then recomputed on ``x``. Returns the mean loss."""
    if len(y) == 0 or epochs == 0:
        return 0.0
    xs, ys = _as_tensor(x, device), _as_tensor(y, device)
    table = held = None
    if prototypes is not None and classes is not None and len(classes):
        ids = torch.as_tensor(classes, device=device).long()
        table = torch.zeros(num_classes, prototypes.shape[1], device=device)
        table[ids] = torch.as_tensor(prototypes, device=device)
        held = torch.zeros(num_classes, dtype=torch.bool, device=device)
        held[ids] = True

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        logits, embedding = _logits_and_embedding(model, xs[idx], projection)
        loss = F.cross_entropy(logits, ys[idx])
        if table is not None and weight > 0:
            labels = ys[idx]
            rows = held[labels]
            if bool(rows.any()):
                loss = loss + weight * F.mse_loss(embedding[rows].float(), table[labels[rows]])
        return loss

    mean_loss = _fit(model, len(ys), batch_loss, epochs, batch_size, optim, device, seed)
    if recalibrate:
        recalibrate_batch_norm(model, x, batch_size, device)
    return mean_loss


@torch.no_grad()
def embeddings(model: nn.Module, x: np.ndarray, device: torch.device,
               projection: torch.Tensor | None) -> np.ndarray:
    """``[n, d]`` float32 (projected) embeddings of ``x`` in eval mode."""
    batch_size = inference_batch_size(device)
    _prepare(model, device).eval()
    xs = _as_tensor(x, device)
    parts = [_logits_and_embedding(model, xs[s : s + batch_size], projection)[1].float()
             for s in range(0, len(xs), batch_size)]
    return torch.cat(parts).cpu().numpy() if parts else np.zeros((0, 0), np.float32)
