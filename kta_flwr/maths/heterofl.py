"""HeteroFL's parameter maths (Diao, Ding and Tarokh, "HeteroFL: Computation and
Communication Efficient Federated Learning for Heterogeneous Clients", ICLR 2021). Pure
numpy, no Flower.

One global model at full width; a client of width rate ``r`` trains the sub-model that
keeps the *first* ``ceil(r * c)`` channels of every hidden layer (inputs and classes stay
whole). Both sides only need each tensor's shape in the client's sub-model: the
sub-model is the leading block ``w[:s_0, :s_1, ...]`` of every global tensor ``w``
(:func:`extract`). The server averages each entry of each tensor over exactly the clients
whose sub-model holds it, and keeps the global value where none does (:func:`aggregate`,
the paper's Algorithm 1; the clients count alike, as in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["aggregate", "extract", "leading_block"]


def leading_block(shape: Sequence[int]) -> tuple[slice, ...]:
    """The index of the leading block of ``shape``: ``(slice(0, s_0), slice(0, s_1), ...)``."""
    return tuple(slice(0, size) for size in shape)


def extract(global_params: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """A client's sub-model: the leading block of each global tensor.

    Args:
        global_params: name -> global tensor.
        shapes: name -> the tensor's shape in the client's sub-model (every name of
            ``global_params``, each dimension at most the global one).

    Returns:
        name -> a copy of ``global_params[name][:s_0, :s_1, ...]``.

    Raises:
        ValueError: naming a tensor whose sub-model shape does not fit inside the global one.
    """
    out = {}
    for name, tensor in global_params.items():
        shape = tuple(shapes[name])
        if len(shape) != tensor.ndim or any(s > g for s, g in zip(shape, tensor.shape)):
            raise ValueError(f"HeteroFL: tensor {name!r} of the sub-model has shape {shape}, "
                             f"which does not fit inside the global {tensor.shape}")
        out[name] = np.array(tensor[leading_block(shape)])
    return out


def aggregate(global_params: Mapping[str, np.ndarray],
              client_params: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The new global model: every entry the mean of the clients' values for it, over the
    clients whose sub-model holds it; entries no client holds keep their global value.

    Args:
        global_params: name -> global tensor (its shape is the full model's).
        client_params: per client, name -> its trained sub-model tensor (a leading block
            of the global one).

    Returns:
        name -> float tensor of the global shape and dtype.
    """
    out = {}
    for name, tensor in global_params.items():
        total = np.zeros(tensor.shape, np.float64)
        count = np.zeros(tensor.shape, np.int64)
        for params in client_params:
            block = leading_block(params[name].shape)
            total[block] += params[name]
            count[block] += 1
        held = count > 0
        merged = np.array(tensor, np.float64)
        merged[held] = total[held] / count[held]
        out[name] = merged.astype(tensor.dtype)
    return out
