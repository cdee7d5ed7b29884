"""Datasets, the public reference split, and client partitions.

Every node (server and clients) derives the same three disjoint splits from the dataset
and the seed: a labeled **test** set, a labeled public **reference** set, and the
**training pool**. Only the training pool is partitioned across clients, with
flwr-datasets' partitioners (Dirichlet over labels, or IID). Clients read the reference
inputs locally; only predictions on them ever cross the wire.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner
from sklearn.model_selection import train_test_split

from kta_flwr.config import ConfigError, RunConfig


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs ``x`` (float32, ``[M, *input_shape]``) and integer labels ``y`` (``[M]``)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int


def load_digits(data_path: str) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits: 1,797 images, 1x8x8 in [0, 1], 10 classes.

    Ships with scikit-learn, so it works offline; ``data_path`` is ignored.
    """
    del data_path
    from sklearn.datasets import load_digits as sk_digits  # pylint: disable=import-outside-toplevel

    bunch = sk_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    return ArrayDataset(x=x, y=bunch.target.astype(np.int64), num_classes=10)


#: Dataset name -> loader taking the run config's ``data-path``.
DATASETS: dict[str, Callable[[str], ArrayDataset]] = {"digits": load_digits}


@dataclass(frozen=True)
class CentralSplits:
    """The three disjoint splits every node derives identically from (dataset, seed)."""

    train: ArrayDataset  # training pool, partitioned across clients
    reference: ArrayDataset  # public, labeled reference set
    test: ArrayDataset  # global test set

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return self.train.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.train.x.shape[1:])

    @property
    def reference_fingerprint(self) -> str:
        """Short hash of the reference inputs and labels.

        The server sends it with every instruction so a client whose copy of the data
        differs refuses to answer instead of returning logits in the wrong order.
        """
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.reference.x).tobytes())
        digest.update(np.ascontiguousarray(self.reference.y).tobytes())
        return digest.hexdigest()[:16]


def load_splits(cfg: RunConfig) -> CentralSplits:
    """Load ``cfg.dataset`` and split it into train pool / reference / test.

    The reference and test sets are stratified by label and drawn with ``cfg.seed``.

    Raises:
        ConfigError: if ``reference-size + test-size`` leaves no training data.
    """
    return _load_splits(cfg.dataset, cfg.data_path, cfg.reference_size, cfg.test_size, cfg.seed)


@lru_cache(maxsize=4)
def _load_splits(
    dataset: str, data_path: str, reference_size: int, test_size: int, seed: int
) -> CentralSplits:
    full = DATASETS[dataset](data_path)
    total = len(full.y)
    if reference_size + test_size >= total or reference_size < full.num_classes:
        raise ConfigError(
            f"run-config 'reference-size' = {reference_size} with 'test-size' = "
            f"{test_size} does not fit dataset {dataset!r} of {total} samples: need "
            f"reference-size >= {full.num_classes} (one per class) and "
            f"reference-size + test-size < {total}"
        )
    idx = np.arange(total)
    rest, test_idx = train_test_split(
        idx, test_size=test_size, stratify=full.y, random_state=seed
    )
    train_idx, ref_idx = train_test_split(
        rest, test_size=reference_size, stratify=full.y[rest], random_state=seed + 1
    )

    def take(rows: np.ndarray) -> ArrayDataset:
        rows = np.sort(rows)
        return ArrayDataset(full.x[rows], full.y[rows], full.num_classes)

    return CentralSplits(take(train_idx), take(ref_idx), take(test_idx))


def partition_indices(
    labels: np.ndarray, num_partitions: int, cfg: RunConfig
) -> tuple[np.ndarray, ...]:
    """Indices into the training pool for each of ``num_partitions`` clients.

    Uses flwr-datasets' ``DirichletPartitioner`` (label skew with ``dirichlet-alpha``) or
    ``IidPartitioner``, seeded with ``cfg.seed``. Partitions are disjoint.

    Raises:
        ConfigError: if there are more partitions than samples, or the Dirichlet draw
            cannot give every client a minimum number of samples.
    """
    return _partition_indices(
        labels.tobytes(), len(labels), num_partitions, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed
    )


@lru_cache(maxsize=8)
def _partition_indices(
    label_bytes: bytes, size: int, num_partitions: int, kind: str, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    if num_partitions > size:
        raise ConfigError(
            f"{num_partitions} clients (num-partitions) but the training pool has only "
            f"{size} samples: use fewer clients or a smaller 'reference-size'/'test-size'"
        )
    labels = np.frombuffer(label_bytes, dtype=np.int64, count=size)
    table = Dataset.from_dict({"label": labels, "row": np.arange(size)})
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(10, size // num_partitions),
            self_balancing=False,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        return tuple(
            np.asarray(partitioner.load_partition(pid)["row"], dtype=np.int64)
            for pid in range(num_partitions)
        )
    except ValueError as err:
        raise ConfigError(
            f"partitioning {size} samples into {num_partitions} clients with "
            f"'partitioner' = {kind!r}, 'dirichlet-alpha' = {alpha} failed: {err}"
        ) from err


@dataclass(frozen=True)
class ClientData:
    """What one client sees: its private training rows plus the public sets."""

    train: ArrayDataset
    splits: CentralSplits

    @property
    def label_distribution(self) -> np.ndarray:
        """``[C]`` fraction of this client's training samples in each class."""
        counts = np.bincount(self.train.y, minlength=self.splits.num_classes)
        return counts / max(counts.sum(), 1)


def load_client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """The private training partition of client ``partition_id`` and the shared splits."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node-config 'partition-id' = {partition_id} must be in [0, {num_partitions})"
        )
    splits = load_splits(cfg)
    rows = partition_indices(splits.train.y, num_partitions, cfg)[partition_id]
    train = ArrayDataset(splits.train.x[rows], splits.train.y[rows], splits.num_classes)
    return ClientData(train=train, splits=splits)
