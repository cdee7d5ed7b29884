"""The market's heavy kernels in torch, for a GPU (run-config ``market-device``).

The same three computations and definitions as :mod:`kta_flwr.maths.market_kernels`
(numpy arrays in and out), written for a device with memory to spare: Jensen-Shannon over
``[b, K, N·C]`` blocks of client pairs instead of cache tiles, and float64 where the
market's decisions are taken (divergences' sums, mixes, label scores). On the CPU they
are tested against the direct formulas (``tests/test_market_scale.py``); no GPU was lent
to this project, so their speed on one is unmeasured.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch

from kta_flwr.config import ConfigError
from kta_flwr.maths.market_kernels import EPS, FAST, MarketKernels, check_divergence

#: Elements of one device temporary (float64: 1 GiB).
_BLOCK_ELEMENTS = 2**27


def market_kernels(name: str) -> MarketKernels:
    """The kernels for run-config ``market-device``: ``cpu`` the numpy kernels, ``cuda``
    these on the GPU, ``auto`` the GPU when there is one.

    Raises:
        ConfigError: ``cuda`` without a CUDA device.
    """
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return FAST
    if not torch.cuda.is_available():
        raise ConfigError("run-config 'market-device' = 'cuda' but no CUDA device is available")
    return torch_kernels(torch.device("cuda"))


def torch_kernels(device: torch.device) -> MarketKernels:
    """The three kernels on ``device``."""
    return MarketKernels(
        divergence=partial(pairwise_divergence, device=device),
        targets=partial(soft_targets, device=device),
        label_probability=partial(label_probability, device=device),
    )


def _tensor(values: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), device=device).to(dtype)


def pairwise_divergence(probs: np.ndarray, kind: str = "js", *, device: torch.device) -> np.ndarray:
    """``[K, K]`` mean per-row divergence of ``[K, N, C]`` predictions (``js``, ``skl``,
    ``hellinger`` or ``cosine``), float64."""
    check_divergence(kind)
    num_clients, num_rows = probs.shape[:2]
    p = _tensor(probs, device, torch.float32).clamp(EPS, 1.0)
    flat = p.reshape(num_clients, -1)
    wide = flat.double()
    if kind == "js":  # (H_j + H_k)/2 - (1/2) sum s log s + (ln 2 / 2) sum s, s = p_j + p_k
        entropy, mass = (wide * wide.log()).sum(1), wide.sum(1)
        sums = torch.empty(num_clients, num_clients, dtype=torch.float64, device=device)
        step = max(1, _BLOCK_ELEMENTS // max(1, flat.numel()))
        for start in range(0, num_clients, step):
            pair = flat[start:start + step, None, :] + flat[None, :, :]  # [b, K, N*C]
            sums[start:start + step] = torch.xlogy(pair, pair).sum(-1, dtype=torch.float64)
        out = 0.5 * (entropy[:, None] + entropy[None]) - 0.5 * sums \
            + 0.5 * math.log(2.0) * (mass[:, None] + mass[None])
    elif kind == "skl":
        logs = wide.log()
        cross, own = wide @ logs.T, (wide * logs).sum(1)
        out = 0.5 * (own[:, None] + own[None] - cross - cross.T)
    elif kind == "hellinger":
        roots = wide.sqrt()
        out = num_rows - roots @ roots.T
    else:
        rows = p.double() / p.double().norm(dim=-1, keepdim=True).clamp_min(EPS)
        rows = rows.reshape(num_clients, -1)
        out = num_rows - rows @ rows.T
    out = (0.5 * (out + out.T) / num_rows).clamp_min(0.0)
    out.fill_diagonal_(0.0)
    return out.cpu().numpy()


def _scales(priors: np.ndarray | None, num_clients: int, num_classes: int, temperature: float,
            device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(log pi or None, rho = pi ** (1/T) scaled to max 1)``, ``[K, C]`` float64."""
    if priors is None:
        return None, torch.ones(num_clients, num_classes, dtype=torch.float64, device=device)
    log_prior = _tensor(np.log(priors), device, torch.float64)
    return log_prior, ((log_prior - log_prior.amax(1, keepdim=True)) / temperature).exp()


def _shifted(block: torch.Tensor, log_prior: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """``exp((z - log pi - max) / T)`` of ``[K, b, C]`` logits as ``[b, K, C]``."""
    a = block.double().transpose(0, 1)
    if log_prior is not None:
        a = a - log_prior[None]
    return ((a - a.amax(-1, keepdim=True)) / temperature).exp()


def _logit_mix(z: torch.Tensor, weights: torch.Tensor, log_prior: torch.Tensor | None) -> torch.Tensor:
    """``sum_j W[k, j] z_j`` (+ the prior shift) of ``[J, M, C]`` logits by ``[K, J]``
    weights (the K students are the first K teachers): ``[K, M, C]`` float64."""
    num_students = len(weights)
    mixed = (weights @ z.reshape(len(z), -1).double()).reshape(num_students, *z.shape[1:])
    if log_prior is not None:
        mixed = mixed + (log_prior[:num_students] - weights @ log_prior)[:, None, :]
    return mixed


def soft_targets(logits: np.ndarray, weights: np.ndarray, *, temperature: float = 1.0,
                 space: str = "prob", priors: np.ndarray | None = None,
                 device: torch.device) -> np.ndarray:
    """Personalized soft targets ``[K, N, C]`` (float32, rows sum to 1) of ``[J, N, C]``
    teacher logits and ``[K, J]`` weights (the K students are the first K teachers)."""
    if space not in ("prob", "logit"):
        raise ValueError(f"unknown target space {space!r}; use prob or logit")
    num_teachers, num_rows, num_classes = logits.shape
    num_clients = len(weights)
    z = _tensor(logits, device, torch.float32)
    w = _tensor(weights, device, torch.float64)
    log_prior, rho = _scales(priors, num_teachers, num_classes, temperature, device)
    if space == "logit":
        return torch.softmax(_logit_mix(z, w, log_prior) / temperature, -1).float().cpu().numpy()
    out = torch.empty(num_clients, num_rows, num_classes, device=device)
    rho = rho[:num_clients]
    step = max(1, _BLOCK_ELEMENTS // (num_teachers * max(num_teachers, num_classes)))
    for start in range(0, num_rows, step):
        expd = _shifted(z[:, start:start + step], log_prior, temperature)  # [b, J, C]
        mix = w[None] / (rho[None] @ expd.transpose(1, 2))  # W[k, j] / Z: [b, K(k), J]
        targets = (mix @ expd) * rho[None]  # [b, K(k), C]
        out[:, start:start + step] = (targets / targets.sum(-1, keepdim=True)).transpose(0, 1).float()
    return out.cpu().numpy()


def label_probability(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, *,
                      space: str = "prob", priors: np.ndarray | None = None,
                      device: torch.device) -> np.ndarray:
    """``[G, K, M]`` probability each candidate mix (``weights`` ``[G, K, J]`` over
    ``[J, M, C]`` teacher logits, the K students first) gives the true labels of the M
    scoring rows, at T = 1 (float64)."""
    num_teachers, num_rows, num_classes = logits.shape
    num_clients = weights.shape[-2]
    z = _tensor(logits, device, torch.float32)
    w = _tensor(weights, device, torch.float64)
    y = torch.as_tensor(np.asarray(labels), device=device, dtype=torch.long)
    log_prior, rho = _scales(priors, num_teachers, num_classes, 1.0, device)
    if space == "logit":
        picked = [
            torch.log_softmax(_logit_mix(z, w[g], log_prior), -1)
            .gather(-1, y[None, :, None].expand(num_clients, -1, 1))[..., 0].exp()
            for g in range(len(w))
        ]
        return torch.stack(picked).cpu().numpy()
    out = torch.empty(len(w), num_clients, num_rows, dtype=torch.float64, device=device)
    rho = rho[:num_clients]
    step = max(1, _BLOCK_ELEMENTS // (num_teachers * num_teachers))
    for start in range(0, num_rows, step):
        expd = _shifted(z[:, start:start + step], log_prior, 1.0)  # [b, J, C]
        rows = y[start:start + step]
        hit = expd.gather(-1, rows[:, None, None].expand(-1, num_teachers, 1))  # [b, J, 1]
        ratio = hit / (expd @ rho.T)  # [b, J, K(k)]
        mixed = torch.einsum("gkj,ijk->gki", w, ratio)
        out[:, :, start:start + step] = mixed * rho[:, rows][None]
    return out.cpu().numpy()
