"""FedProto's prototype maths (Tan et al., "FedProto: Federated Prototype Learning across
Heterogeneous Clients", AAAI 2022). Pure numpy, no Flower.

A client's prototype of class j is the mean embedding ``f(x)`` (``[d]``) of its samples
of class j (:func:`class_prototypes`); it uploads those of the classes it holds with
their class ids (at most ``C x d`` float32 and ``C`` int32). The server's global
prototype of class j is the plain mean of the clients' prototypes of j over the clients
that hold j (:func:`aggregate_prototypes`, as the authors' code averages them) and is
sent down as ``[C, d]`` float32 with a ``[C]`` mask of the classes some client holds.
Clients train with cross-entropy plus ``lambda * ||f(x) - P[y]||^2`` toward the global
prototypes. Where the tiers' embeddings differ in width, each client projects its
embedding to the common size ``d`` with a linear layer it trains with its model.
"""

from __future__ import annotations

import numpy as np

__all__ = ["aggregate_prototypes", "class_prototypes"]


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's prototypes.

    Args:
        embeddings: ``[n, d]`` its samples' embeddings; labels: ``[n]`` in ``[0, C)``.
        num_classes: ``C``.

    Returns:
        ``([m, d] float32 mean embedding of each class it holds, [m] int32 those classes,
        ascending)``.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if classes.size and (classes[0] < 0 or classes[-1] >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {classes[0]} .. {classes[-1]}")
    sums = np.zeros((num_classes, embeddings.shape[1]), np.float64)
    np.add.at(sums, labels, embeddings)
    counts = np.bincount(labels, minlength=num_classes)[classes]
    return (sums[classes] / counts[:, None]).astype(np.float32), classes.astype(np.int32)


def aggregate_prototypes(uploads: list[tuple[np.ndarray, np.ndarray]], num_classes: int,
                         dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The global prototypes.

    Args:
        uploads: per client, ``([m, d] prototypes, [m] their classes)``.
        num_classes: ``C``; dim: ``d``.

    Returns:
        ``([C, d] float32, [C] bool)``: each class's mean prototype over the clients that
        hold it (zeros where none does), and which classes some client holds.
    """
    sums = np.zeros((num_classes, dim), np.float64)
    holders = np.zeros(num_classes, np.int64)
    for prototypes, classes in uploads:
        sums[classes] += prototypes
        holders[classes] += 1
    held = holders > 0
    sums[held] /= holders[held, None]
    return sums.astype(np.float32), held
