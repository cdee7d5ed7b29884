"""Splits and partitions of the embedded digits dataset."""

import numpy as np
import pytest

from kta_flwr.config import RunConfig
from kta_flwr.task.splits import load_client_data, load_splits, partition_indices


def _rows(x):
    return {row.tobytes() for row in x}


def test_splits_sizes_and_disjoint():
    cfg = RunConfig(reference_size=200, test_size=250)
    splits = load_splits(cfg)
    assert len(splits.reference.y) == 200 and len(splits.test.y) == 250
    assert len(splits.train.y) == 1797 - 450
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    # stratified: every class in the reference and test sets
    assert set(splits.reference.y) == set(range(10)) == set(splits.test.y)
    # the same indices never appear twice: digits has a few duplicate images, so compare
    # concatenated (image, label) multiset sizes instead of set overlap
    total = np.concatenate([splits.train.x, splits.reference.x, splits.test.x])
    assert len(total) == 1797


def test_splits_are_deterministic_and_seeded():
    a, b = load_splits(RunConfig(seed=1)), load_splits(RunConfig(seed=1))
    c = load_splits(RunConfig(seed=2))
    assert a.reference_fingerprint == b.reference_fingerprint != c.reference_fingerprint


#: Partitioner -> (clients, the most rows it may leave unused by design).
UNUSED = {"dirichlet": (10, 0), "iid": (10, 0), "linear": (10, 0), "exponential": (4, 0),
          "pathological": (10, 0),  # K >= C: every class is some client's first
          "shard": (10, 2 * 10 - 1)}  # the remainder under one shard of size / (K * 2)


@pytest.mark.parametrize("partitioner", sorted(UNUSED))
def test_every_named_partitioner_is_seeded_disjoint_and_covers_the_pool(partitioner):
    clients, unused = UNUSED[partitioner]
    cfg = RunConfig(partitioner=partitioner, seed=1)
    labels = load_splits(cfg).train.y
    parts = partition_indices(labels, clients, cfg)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) >= len(labels) - unused
    assert all(len(p) > 0 for p in parts)
    again = partition_indices(labels, clients, RunConfig(partitioner=partitioner, seed=1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if partitioner != "iid":  # iid's shuffle is flwr-datasets' own, not seeded by us
        other = partition_indices(labels, clients, RunConfig(partitioner=partitioner, seed=2))
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_the_label_skewed_partitioners_give_what_their_names_say():
    labels = load_splits(RunConfig()).train.y
    classes = lambda cfg: [len(np.unique(labels[p])) for p in partition_indices(labels, 10, cfg)]  # noqa: E731
    assert classes(RunConfig(partitioner="pathological", classes_per_partition=3)) == [3] * 10
    assert max(classes(RunConfig(partitioner="shard", shards_per_partition=2))) <= 4
    sizes = [len(p) for p in partition_indices(labels, 10, RunConfig(partitioner="linear"))]
    assert sizes == sorted(sizes) and sizes[-1] > 8 * sizes[0]


def test_the_existing_names_give_the_partitions_they_gave_before():
    """digits, seed 0, 10 clients: sizes and the first three clients' label counts as
    measured before the partitioners were added (flwr-datasets 0.6's Dirichlet and IID)."""
    labels = load_splits(RunConfig()).train.y
    dirichlet = partition_indices(labels, 10, RunConfig(partitioner="dirichlet"))
    assert [len(p) for p in dirichlet] == [21, 127, 139, 152, 189, 128, 146, 60, 133, 102]
    assert [np.bincount(labels[p], minlength=10).tolist() for p in dirichlet[:3]] == [
        [7, 0, 5, 3, 0, 0, 1, 1, 0, 4], [1, 18, 2, 1, 26, 10, 21, 18, 30, 0],
        [18, 15, 1, 17, 0, 17, 61, 2, 8, 0]]
    iid = partition_indices(labels, 10, RunConfig(partitioner="iid"))
    assert [len(p) for p in iid] == [120] * 7 + [119] * 3
    assert [np.bincount(labels[p], minlength=10).tolist() for p in iid[:2]] == [
        [12, 11, 11, 13, 11, 14, 12, 13, 13, 10], [11, 12, 12, 16, 13, 11, 11, 12, 13, 9]]


def test_dirichlet_alpha_controls_skew():
    def skew(alpha):
        cfg = RunConfig(dirichlet_alpha=alpha)
        dists = [load_client_data(cfg, k, 10).label_distribution for k in range(10)]
        return np.mean([d.max() for d in dists])

    assert skew(0.1) > skew(100.0)


def test_client_data_label_distribution():
    data = load_client_data(RunConfig(), 3, 10)
    assert data.label_distribution.sum() == pytest.approx(1.0)
    assert len(data.train.y) > 0
