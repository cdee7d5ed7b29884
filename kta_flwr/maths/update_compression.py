"""Compressed model updates for the parameter baselines: Top-k with error feedback (EF),
step-ahead partial error feedback (SA-PEF) and SVD (FedKD). Pure numpy, no Flower.

A model's floating-point state is handled as one flat float32 vector ``[P]``
(:class:`ParamLayout`); an update is a difference of two such vectors. A compressed
update is a payload: a dict of named numpy arrays, whose bytes (values plus indices, or
SVD factors, in their real dtypes) are what :mod:`kta_flwr.flower.metering` counts on the wire.

==========  ==================================================  ===========================
compressor  payload                                             bytes
==========  ==================================================  ===========================
``topk``    ``idx`` int32 ``[k]`` + ``val`` float32 ``[k]``     ``8 k``
            (positions in the flat vector, ascending)
``svd``     per tensor with >= 2 dims, reshaped to ``[m, n]``:  ``4 r (m + n + 1)`` per
            ``<name>.u`` ``[m, r]``, ``<name>.s`` ``[r]``,      factored tensor, ``4 m n``
            ``<name>.vt`` ``[r, n]`` (float32), ``r`` the       per dense one
            smallest rank holding ``energy`` of the squared
            singular values; ``<name>`` dense where factors
            would not be smaller, and for 0/1-dim tensors
==========  ==================================================  ===========================

**Error feedback** (Seide et al. 2014; Karimireddy et al. 2019): the client adds its
residual ``e`` to its update, sends ``C(v)`` and keeps ``e' = v - C(v)``, so nothing is
lost, only delayed: ``sum of sent + e' = sum of updates`` (:func:`error_feedback`).

**SA-PEF** (Redie, Arablouei, Werner 2026): the client starts local training from
``x + alpha e`` (a step ahead by a fraction ``alpha`` of its residual) instead of the
global model ``x``, trains to ``y``, and compresses ``v = (y - x) + (1 - alpha) e``: the
previewed part ``alpha e`` is already inside ``y - x``, the rest is carried by plain EF.
``alpha = 0`` is EF, ``alpha = 1`` step-ahead EF (SAEF); :func:`sapef_start` and
:func:`sapef_vector`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

COMPRESSORS = ("topk", "svd")


class CompressionError(ValueError):
    """A payload does not match its compressor or the model (names, shapes, values)."""


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a model's floating-point state entries, in state-dict order.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are not part of the layout:
    they stay on the client.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, object]) -> ParamLayout:
        """The layout of a state dict (torch tensors or numpy arrays)."""
        names, shapes = [], []
        for name, value in state.items():
            array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
            if np.issubdtype(array.dtype, np.floating):
                names.append(name)
                shapes.append(tuple(array.shape))
        return cls(tuple(names), tuple(shapes))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of values of each entry."""
        return tuple(int(np.prod(shape)) for shape in self.shapes)

    @property
    def size(self) -> int:
        """P: values in the flat vector."""
        return sum(self.sizes)

    def flatten(self, state: Mapping[str, object]) -> np.ndarray:
        """The layout's entries of ``state`` concatenated: float32 ``[P]``."""
        parts = []
        for name in self.names:
            value = state[name]
            array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            parts.append(array.astype(np.float32, copy=False).reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """``[P]`` back to ``{name: array of its shape}`` (views into ``vector``)."""
        if vector.shape != (self.size,):
            raise CompressionError(f"vector has shape {vector.shape}, layout needs ({self.size},)")
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = vector[start : start + size].reshape(shape)
            start += size
        return out


# --- Top-k sparsification and error feedback -------------------------------------------
def topk_count(size: int, fraction: float) -> int:
    """Entries kept by Top-k of a ``size``-vector at ``fraction`` (at least 1)."""
    return max(1, min(size, int(round(fraction * size))))


def sparsify(vector: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The ``k`` entries of largest magnitude of ``[P]``: ``{"idx": int32[k] ascending,
    "val": float32[k]}``. Ties are broken by position, so the result is deterministic."""
    vector = np.asarray(vector, np.float32)
    k = min(k, vector.size)
    order = np.argsort(-np.abs(vector), kind="stable")[:k]
    idx = np.sort(order).astype(np.int32)
    return {"idx": idx, "val": vector[idx].copy()}


def sparse_of_nonzeros(vector: np.ndarray) -> dict[str, np.ndarray]:
    """Every nonzero entry of ``[P]`` in the Top-k payload format (lossless)."""
    idx = np.flatnonzero(vector).astype(np.int32)
    return {"idx": idx, "val": np.asarray(vector, np.float32)[idx]}


def densify(payload: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    """A Top-k payload as a dense float32 ``[size]`` vector.

    Raises:
        CompressionError: names, dtypes, lengths, index range or order, or non-finite values.
    """
    if set(payload) != {"idx", "val"}:
        raise CompressionError(f"sparse payload needs arrays 'idx' and 'val', got {sorted(payload)}")
    idx, val = np.asarray(payload["idx"]), np.asarray(payload["val"])
    if idx.ndim != 1 or val.shape != idx.shape:
        raise CompressionError(f"'idx' {idx.shape} and 'val' {val.shape} must be equal 1-D shapes")
    if not np.issubdtype(idx.dtype, np.integer) or val.dtype != np.float32:
        raise CompressionError(f"'idx' must be integers and 'val' float32, got {idx.dtype}, {val.dtype}")
    if idx.size and (idx[0] < 0 or idx[-1] >= size or (np.diff(idx) <= 0).any()):
        raise CompressionError(f"'idx' must be strictly ascending positions in [0, {size})")
    if not np.isfinite(val).all():
        raise CompressionError("'val' holds NaN or inf")
    out = np.zeros(size, np.float32)
    out[idx] = val
    return out


def error_feedback(vector: np.ndarray, k: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Compress ``v = update + residual`` (``[P]``) by Top-k and return ``(payload,
    new residual)`` with ``densify(payload) + new residual == v`` exactly."""
    vector = np.asarray(vector, np.float32)
    payload = sparsify(vector, k)
    residual = vector.copy()
    residual[payload["idx"]] = 0.0
    return payload, residual


def sapef_start(global_vector: np.ndarray, residual: np.ndarray, alpha: float) -> np.ndarray:
    """Where SA-PEF starts local training: ``x + alpha e`` (``[P]``)."""
    return (global_vector + np.float32(alpha) * residual).astype(np.float32)


def sapef_vector(
    trained: np.ndarray, global_vector: np.ndarray, residual: np.ndarray, alpha: float
) -> np.ndarray:
    """What SA-PEF compresses: ``(y - x) + (1 - alpha) e`` (``[P]``), ``y`` the trained
    model, ``x`` the global model, ``e`` the residual (EF at ``alpha = 0``)."""
    return ((trained - global_vector) + np.float32(1.0 - alpha) * residual).astype(np.float32)


# --- SVD (FedKD) ----------------------------------------------------------------------
def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """The smallest ``r`` with ``sum(s[:r]^2) >= energy * sum(s^2)`` (``s`` descending);
    at least 1."""
    power = np.asarray(singular_values, np.float64) ** 2
    total = power.sum()
    if total <= 0:
        return 1
    cumulative = np.cumsum(power) / total
    return int(min(len(power), np.searchsorted(cumulative, energy - 1e-12) + 1))


def svd_compress(
    update: Mapping[str, np.ndarray], energy: float
) -> dict[str, np.ndarray]:
    """SVD-factor each tensor of ``update`` (``{name: array}``) keeping ``energy`` of its
    squared singular values; tensors with < 2 dims, or whose factors would not be smaller,
    stay dense under their own name."""
    if not 0.0 < energy <= 1.0:
        raise CompressionError(f"SVD energy threshold must be in (0, 1], got {energy}")
    payload: dict[str, np.ndarray] = {}
    for name, value in update.items():
        array = np.asarray(value, np.float32)
        if array.ndim < 2:
            payload[name] = array.reshape(-1).copy()
            continue
        matrix = array.reshape(array.shape[0], -1)
        m, n = matrix.shape
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        r = energy_rank(s, energy)
        if r * (m + n + 1) >= m * n:
            payload[name] = matrix.reshape(-1).copy()
            continue
        payload[f"{name}.u"] = np.ascontiguousarray(u[:, :r], np.float32)
        payload[f"{name}.s"] = s[:r].astype(np.float32)
        payload[f"{name}.vt"] = np.ascontiguousarray(vt[:r], np.float32)
    return payload


def svd_decompress(payload: Mapping[str, np.ndarray], layout: ParamLayout) -> np.ndarray:
    """An :func:`svd_compress` payload of an update in ``layout`` as a flat ``[P]`` vector.

    Raises:
        CompressionError: a tensor missing or extra, factor shapes that do not match the
            layout, non-finite values.
    """
    expected = set()
    parts = []
    for name, shape, size in zip(layout.names, layout.shapes, layout.sizes):
        if name in payload:
            part = np.asarray(payload[name], np.float32).reshape(-1)
            expected.add(name)
        elif f"{name}.u" in payload:
            keys = (f"{name}.u", f"{name}.s", f"{name}.vt")
            if not all(k in payload for k in keys):
                raise CompressionError(f"'{name}' needs factors {list(keys)}")
            u, s, vt = (np.asarray(payload[k], np.float32) for k in keys)
            m, n = shape[0], size // shape[0]
            r = len(s)
            if u.shape != (m, r) or s.shape != (r,) or vt.shape != (r, n):
                raise CompressionError(
                    f"'{name}' factors {u.shape}, {s.shape}, {vt.shape} do not fit [{m}, {n}]"
                )
            part = ((u * s) @ vt).reshape(-1)
            expected.update(keys)
        else:
            raise CompressionError(f"payload has no entry for tensor '{name}'")
        if part.size != size:
            raise CompressionError(f"'{name}' has {part.size} values, the model needs {size}")
        parts.append(part)
    extra = sorted(set(payload) - expected)
    if extra:
        raise CompressionError(f"payload has arrays the model does not: {extra}")
    vector = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if not np.isfinite(vector).all():
        raise CompressionError("payload holds NaN or inf")
    return vector


@dataclass(frozen=True)
class UpdateCodec:
    """How updates of one model layout are compressed: ``topk`` at ``fraction`` of the
    values, or ``svd`` at an energy threshold that moves linearly from ``energy`` in round
    1 to ``energy_end`` in round ``rounds`` (FedKD's dynamic threshold)."""

    layout: ParamLayout
    name: str = "topk"
    fraction: float = 0.01
    energy: float = 0.95
    energy_end: float = 0.95
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.name not in COMPRESSORS:
            raise ValueError(f"unknown compressor {self.name!r}; choose one of {list(COMPRESSORS)}")

    @property
    def k(self) -> int:
        """Top-k: entries each client sends."""
        return topk_count(self.layout.size, self.fraction)

    def energy_at(self, server_round: int) -> float:
        """SVD energy threshold of round ``server_round`` (1-based)."""
        share = 0.0 if self.rounds <= 1 else (server_round - 1) / (self.rounds - 1)
        return self.energy + (self.energy_end - self.energy) * min(max(share, 0.0), 1.0)

    def compress(self, update: np.ndarray, server_round: int) -> dict[str, np.ndarray]:
        """A client's ``[P]`` update as its payload (Top-k without feedback, or SVD)."""
        if self.name == "topk":
            return sparsify(update, self.k)
        return svd_compress(self.layout.unflatten(update), self.energy_at(server_round))

    def compress_aggregate(self, update: np.ndarray, server_round: int) -> dict[str, np.ndarray]:
        """The server's aggregated ``[P]`` update as the downlink payload: for Top-k every
        nonzero entry (lossless: the union of the clients' positions), for SVD the same
        energy threshold as the uplink."""
        if self.name == "topk":
            return sparse_of_nonzeros(update)
        return svd_compress(self.layout.unflatten(update), self.energy_at(server_round))

    def decompress_upload(self, payload: Mapping[str, np.ndarray]) -> np.ndarray:
        """A client's payload as a float32 ``[P]`` update, after checking it is no larger
        than a client may send: at most k Top-k entries, SVD factors of rank at most
        ``min(m, n)`` per tensor.

        Raises:
            CompressionError: naming the array that is too large, or as :meth:`decompress`.
        """
        if self.name == "topk":
            count = int(np.asarray(payload.get("idx", ())).size)
            if count > self.k:
                raise CompressionError(f"'idx' has {count} entries, more than k = {self.k}")
        else:
            for name, shape, size in zip(self.layout.names, self.layout.shapes, self.layout.sizes):
                factor = payload.get(f"{name}.s")
                rank = min(shape[0], size // max(shape[0], 1)) if shape else 1
                if factor is not None and np.asarray(factor).size > rank:
                    raise CompressionError(
                        f"'{name}.s' has {np.asarray(factor).size} singular values, the tensor's rank is at most {rank}"
                    )
        return self.decompress(payload)

    def decompress(self, payload: Mapping[str, np.ndarray]) -> np.ndarray:
        """A payload of either direction as a float32 ``[P]`` update."""
        if self.name == "topk":
            return densify(payload, self.layout.size)
        return svd_decompress(payload, self.layout)
