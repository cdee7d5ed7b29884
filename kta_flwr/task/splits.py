"""The public reference split, the test split, and client partitions.

Every node (server and clients) derives the same three disjoint splits from the dataset
(:mod:`kta_flwr.task.datasets`) and the seed:

- a labeled **test** set: a stratified ``test-size`` sample of the dataset's official test
  split, or carved out of the training data when there is none (``test-size = 0`` takes
  the whole official test split);
- a labeled public **reference** set of ``reference-size`` samples, held out of the
  training data (stratified by label; for datasets with writer ids it comes from
  writers that no client uses, and their test rows are dropped);
- the **training pool** (capped at ``max-train-size`` samples when that is > 0), the only
  data partitioned across clients, with flwr-datasets' partitioners (``dirichlet`` over
  labels, ``iid``) or by writer (``natural``: writers dealt round-robin to clients in a
  seeded order, so each writer belongs to exactly one client).

Text stays raw in the splits; each client tokenizes it for its own model (see
:func:`kta_flwr.task.text.encoder_for`), with a word vocabulary built from the training split
(pool + reference) only, or the pretrained MiniLM tokenizer. Clients read the reference inputs locally; only predictions on
them ever cross the wire.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

import numpy as np
from sklearn.model_selection import train_test_split

from kta_flwr.config import ConfigError, RunConfig, is_hub_path
from kta_flwr.task.datasets import DATASETS, ArrayDataset, Source, load_from_hub, load_transfer_inputs
from kta_flwr.task.models import ModelSpec
from kta_flwr.task.text import build_vocab, encoder_for

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

#: The label of every transfer row: the transfer set's labels are never loaded.
UNLABELED = -1

__all__ = ["UNLABELED", "ArrayDataset", "CentralSplits", "ClientData", "load_client_data", "load_splits",
           "shared_split", "writers_of"]


@dataclass(frozen=True, eq=False)  # identity hash: used as a cache key
class CentralSplits:
    """The three disjoint splits every node derives identically from (dataset, seed)."""

    train: ArrayDataset  # training pool, partitioned across clients
    reference: ArrayDataset  # public, labeled reference set
    test: ArrayDataset  # global test set
    train_groups: np.ndarray | None = None  # [len(train)] writer ids, if the data has them
    test_groups: np.ndarray | None = None  # [len(test)] writer ids
    vocab: tuple[str, ...] = ()  # text: the word vocabulary (ids 2.., see kta_flwr.task.text)
    text_length: int = 0  # text: tokens per sample after encoding
    #: The public unlabeled transfer set (``transfer-source``): inputs only, every label
    #: -1 (:data:`UNLABELED`; none is ever read); None without one.
    transfer: ArrayDataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return self.train.num_classes

    @property
    def is_text(self) -> bool:
        """True when the inputs are raw strings (tokenized per model)."""
        return self.train.x.dtype == object

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input: ``[C, H, W]`` images or ``[text-length]`` token ids."""
        return (self.text_length,) if self.is_text else tuple(self.train.x.shape[1:])

    @property
    def spec(self) -> ModelSpec:
        """What a model needs to know about the inputs and classes."""
        vocab_size = len(self.vocab) + 2 if self.is_text else 0
        return ModelSpec(self.input_shape, self.num_classes, vocab_size)

    def spec_for(self, cfg: RunConfig) -> ModelSpec:
        """:attr:`spec` with the run's model options (``finetune-layers``)."""
        return dataclasses.replace(self.spec, finetune_layers=cfg.finetune_layers)

    @cached_property
    def reference_fingerprint(self) -> str:
        """Short hash of the reference inputs and labels.

        The server sends it with every instruction so a client whose copy of the data
        differs refuses to answer instead of returning logits in the wrong order.
        """
        digest = hashlib.sha256()
        if self.is_text:
            digest.update("\x00".join(self.reference.x.tolist()).encode())
        else:
            digest.update(np.ascontiguousarray(self.reference.x).tobytes())
        digest.update(np.ascontiguousarray(self.reference.y).tobytes())
        return digest.hexdigest()[:16]


def load_splits(cfg: RunConfig) -> CentralSplits:
    """Load ``cfg.dataset`` and split it into training pool / reference / test.

    Raises:
        ConfigError: missing data, or sizes that do not fit the dataset.
    """
    transfer = (cfg.transfer_source, cfg.resolved_transfer_path() if cfg.transfer_path else "",
                cfg.transfer_size if cfg.transfer_source else 0)
    return _load_splits(
        cfg.dataset, cfg.resolved_data_path(), cfg.reference_size, cfg.test_size, cfg.max_train_size,
        cfg.vocab_size, cfg.text_length, cfg.seed, transfer,
    )


def _stratified(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``arange(len(labels))`` into (rest, sample of ``size``), stratified if possible."""
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and size >= len(counts[counts > 0]) else None
    rest, sample = train_test_split(idx, test_size=size, stratify=stratify, random_state=seed)
    return np.sort(rest), np.sort(sample)


@lru_cache(maxsize=4)
def _load_splits(  # pylint: disable=too-many-arguments,too-many-locals
    dataset: str,
    data_path: str,
    reference_size: int,
    test_size: int,
    max_train_size: int,
    vocab_size: int,
    text_length: int,
    seed: int,
    transfer_spec: tuple[str, str, int] = ("", "", 0),
) -> CentralSplits:
    src: Source = load_from_hub(dataset, data_path) if is_hub_path(data_path) else DATASETS[dataset](data_path)
    train, groups = src.train, src.train_groups
    # --- test ---------------------------------------------------------------------
    if src.test is not None:
        test, test_groups = src.test, src.test_groups
        if test_size > len(test.y):
            raise ConfigError(
                f"run-config 'test-size' = {test_size} exceeds the {len(test.y)} test "
                f"samples of dataset {dataset!r} (0 takes them all)"
            )
        if 0 < test_size < len(test.y):
            _, rows = _stratified(test.y, test_size, seed)
            test = test.take(rows)
            test_groups = None if test_groups is None else test_groups[rows]
    else:
        if not 0 < test_size < len(train.y):
            raise ConfigError(
                f"run-config 'test-size' = {test_size} must be in [1, {len(train.y)}) for "
                f"dataset {dataset!r}, which has no separate test split"
            )
        rest, rows = _stratified(train.y, test_size, seed)
        test, train = train.take(rows), train.take(rest)
        test_groups = None if groups is None else groups[rows]
        groups = None if groups is None else groups[rest]
    # --- reference ------------------------------------------------------------------
    if reference_size < train.num_classes or reference_size >= len(train.y):
        raise ConfigError(
            f"run-config 'reference-size' = {reference_size} does not fit dataset "
            f"{dataset!r}: need at least {train.num_classes} (one per class) and fewer "
            f"than the {len(train.y)} training samples left after the test split"
        )
    if groups is not None:
        ref_rows, pool_rows = _reference_writers(groups, reference_size, seed)
        keep = np.isin(test_groups, groups[pool_rows])
        test, test_groups = test.take(np.flatnonzero(keep)), test_groups[keep]
    else:
        pool_rows, ref_rows = _stratified(train.y, reference_size, seed + 1)
    reference = train.take(ref_rows)
    pool, pool_groups = train.take(pool_rows), None if groups is None else groups[pool_rows]
    # --- transfer (unlabeled) -------------------------------------------------------
    transfer, pool, pool_groups = _transfer_set(transfer_spec, pool, pool_groups, reference, seed, writers_of(src))
    # --- cap ------------------------------------------------------------------------
    if 0 < max_train_size < len(pool.y):
        _, rows = _stratified(pool.y, max_train_size, seed + 2)
        pool, pool_groups = pool.take(rows), None if pool_groups is None else pool_groups[rows]
    # --- text: the word vocabulary comes from the training split only -----------------
    vocab: tuple[str, ...] = ()
    if src.is_text:
        vocab = build_vocab(list(pool.x) + list(reference.x), vocab_size)
    return CentralSplits(
        pool, reference, test, pool_groups, test_groups, vocab, text_length if src.is_text else 0,
        transfer,
    )


def writers_of(src: Source) -> np.ndarray | None:
    """The distinct writer ids of ``src``'s rows, training and test (None: the data has
    none); a split without ids (a hub dataset with no test split) adds none."""
    groups = [g for g in (src.train_groups, src.test_groups) if g is not None]
    return np.unique(np.concatenate(groups)) if groups else None


def _transfer_set(  # pylint: disable=too-many-arguments
    spec: tuple[str, str, int], pool: ArrayDataset, pool_groups: np.ndarray | None,
    reference: ArrayDataset, seed: int, task_writers: np.ndarray | None = None,
) -> tuple[ArrayDataset | None, ArrayDataset, np.ndarray | None]:
    """(transfer set or None, pool, pool groups): ``spec`` = (source, resolved path,
    size). ``pool`` carves ``size`` rows out of the training pool (whole writers, in a
    seeded order, when the data has writer ids; stratified otherwise), so no client
    holds them; ``emnist``/``femnist``/``file`` draw ``size`` rows of the inputs at the
    path (``femnist``: none of a writer in ``task_writers``, the task's own). Labels
    are dropped (:data:`UNLABELED`). The test set is left as it is."""
    source, path, size = spec
    if not source:
        return None, pool, pool_groups
    if source == "pool":
        if size >= len(pool.y):
            raise ConfigError(
                f"run-config 'transfer-size' = {size} leaves no training data: the pool holds "
                f"{len(pool.y)} rows after the test and reference sets")
        if pool_groups is not None:
            rows, kept = _reference_writers(pool_groups, size, seed + 3)
        else:
            kept, rows = _stratified(pool.y, size, seed + 4)
        inputs = pool.x[rows]
        pool, pool_groups = pool.take(kept), None if pool_groups is None else pool_groups[kept]
    else:
        if reference.x.dtype == object:
            raise ConfigError(f"run-config 'transfer-source' = {source!r} reads images; the task's "
                              "inputs are text (use 'pool')")
        everything = load_transfer_inputs(source, path, tuple(reference.x.shape[1:]), reference.x, task_writers)
        if size > len(everything):
            raise ConfigError(f"run-config 'transfer-size' = {size} exceeds the {len(everything)} "
                              f"inputs at 'transfer-path' = {path!r}")
        inputs = everything[np.sort(np.random.default_rng(seed + 4).choice(len(everything), size, replace=False))]
    return ArrayDataset(inputs, np.full(len(inputs), UNLABELED, np.int64), reference.num_classes), pool, pool_groups


def _reference_writers(
    groups: np.ndarray, reference_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(reference rows, pool rows): whole writers, in a seeded order, until their rows
    cover ``reference_size``; the reference is a random ``reference_size`` of their rows."""
    rng = np.random.default_rng(seed + 1)
    writers = rng.permutation(np.unique(groups))
    sizes = np.array([np.count_nonzero(groups == w) for w in writers])
    count = int(np.searchsorted(np.cumsum(sizes), reference_size) + 1)
    chosen = np.isin(groups, writers[:count])
    ref_rows = np.sort(rng.choice(np.flatnonzero(chosen), reference_size, replace=False))
    return ref_rows, np.flatnonzero(~chosen)


def partition_indices(
    labels: np.ndarray, num_partitions: int, cfg: RunConfig, groups: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Indices into the training pool for each of ``num_partitions`` clients.

    ``natural`` deals whole writers (``groups``) to clients; every other name is one of
    flwr-datasets' partitioners (:func:`flower_partitioner`), seeded with ``cfg.seed``.
    Partitions are disjoint.

    Raises:
        ConfigError: more partitions than samples (or writers), or a Dirichlet draw that
            cannot give every client a minimum number of samples.
    """
    if cfg.partitioner == "natural":
        if groups is None:
            raise ConfigError(
                f"run-config 'partitioner' = 'natural' needs writer ids, which dataset "
                f"{cfg.dataset!r} does not have; use 'dirichlet' or 'iid'"
            )
        return _natural_partitions(groups, num_partitions, cfg.seed)
    options = (cfg.dirichlet_alpha, cfg.shards_per_partition, cfg.classes_per_partition)
    return _partition_indices(labels.tobytes(), len(labels), num_partitions, cfg.partitioner, options, cfg.seed)


def _natural_partitions(groups: np.ndarray, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    writers = np.random.default_rng(seed + 3).permutation(np.unique(groups))
    if num_partitions > len(writers):
        raise ConfigError(
            f"{num_partitions} clients (num-partitions) but the training pool has only "
            f"{len(writers)} writers for 'partitioner' = 'natural'"
        )
    owner = dict(zip(writers.tolist(), np.arange(len(writers)) % num_partitions))
    client = np.array([owner[w] for w in groups.tolist()])
    return tuple(np.flatnonzero(client == pid) for pid in range(num_partitions))


#: flwr-datasets' partitioners that cut the rows in the order given (seeded shuffle first).
ORDERED_CUTS = frozenset({"linear", "exponential"})


def flower_partitioner(kind: str, num_partitions: int, options: tuple[float, int, int], seed: int,
                       size: int) -> "Partitioner":
    """flwr-datasets' partitioner ``kind`` of a ``label`` column: ``dirichlet`` (label skew,
    ``options[0]`` = alpha; at least min(10, size / K) samples each), ``iid``, ``shard``
    (``options[1]`` label-sorted shards each of size/(K · shards) rows: the remainder,
    under one shard, goes unused), ``pathological`` (``options[2]`` classes each: client
    i's first is class i mod C, so with K >= C every class is used, the others are
    random), ``linear`` or ``exponential`` (sizes ∝ i or e^i, cut from the rows in the
    order given: the caller shuffles them, :data:`ORDERED_CUTS`).

    flwr-datasets is imported here, not with the module: its package loads its plots'
    dependencies (~1.3 s of CPU), which the processes that never partition (the
    ServerApp, the tools) need not pay."""
    # pylint: disable-next=import-outside-toplevel
    from flwr_datasets.partitioner import (
        DirichletPartitioner, ExponentialPartitioner, IidPartitioner, LinearPartitioner,
        PathologicalPartitioner, ShardPartitioner,
    )

    alpha, shards, classes = options
    builders: dict[str, Callable[[], Partitioner]] = {
        "iid": lambda: IidPartitioner(num_partitions=num_partitions),
        "dirichlet": lambda: DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=min(10, size // num_partitions), self_balancing=False, seed=seed),
        "shard": lambda: ShardPartitioner(
            num_partitions=num_partitions, partition_by="label", num_shards_per_partition=int(shards),
            seed=seed),
        "pathological": lambda: PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label", num_classes_per_partition=int(classes),
            class_assignment_mode="first-deterministic", seed=seed),
        "linear": lambda: LinearPartitioner(num_partitions=num_partitions),
        "exponential": lambda: ExponentialPartitioner(num_partitions=num_partitions),
    }
    return builders[kind]()


@lru_cache(maxsize=8)
def _partition_indices(  # pylint: disable=too-many-arguments
    label_bytes: bytes, size: int, num_partitions: int, kind: str, options: tuple[float, int, int],
    seed: int,
) -> tuple[np.ndarray, ...]:
    if num_partitions > size:
        raise ConfigError(
            f"{num_partitions} clients (num-partitions) but the training pool has only "
            f"{size} samples: use fewer clients or a smaller 'reference-size'/'test-size'"
        )
    from datasets import Dataset  # pylint: disable=import-outside-toplevel

    labels = np.frombuffer(label_bytes, dtype=np.int64, count=size)
    table = Dataset.from_dict({"label": labels, "row": np.arange(size)})
    shuffled = kind in ORDERED_CUTS
    if shuffled:
        table = table.shuffle(seed=seed)
    partitioner = flower_partitioner(kind, num_partitions, options, seed, size)
    partitioner.dataset = table
    try:
        rows = [np.asarray(partitioner.load_partition(pid)["row"], dtype=np.int64)
                for pid in range(num_partitions)]
        return tuple(np.sort(part) if shuffled else part for part in rows)
    except ValueError as err:
        raise ConfigError(
            f"partitioning {size} samples into {num_partitions} clients with "
            f"'partitioner' = {kind!r} failed: {err} (check 'dirichlet-alpha', "
            "'shards-per-partition', 'classes-per-partition' or the number of clients)"
        ) from err


@dataclass(frozen=True)
class ClientData:
    """What one client sees, ready for its model: its private training rows, the
    reference and test sets, and (with writer ids) its own writers' test rows. Text is
    tokenized for the client's model; ``splits`` keeps the raw shared splits."""

    train: ArrayDataset
    reference: ArrayDataset
    test: ArrayDataset
    splits: CentralSplits
    #: ``[n]`` int64: the training pool's rows this client holds (``splits.train``).
    rows: np.ndarray
    local_test: ArrayDataset | None = None
    transfer: ArrayDataset | None = None  # the unlabeled transfer set, as the model reads it

    @property
    def label_distribution(self) -> np.ndarray:
        """``[C]`` fraction of this client's training samples in each class."""
        counts = np.bincount(self.train.y, minlength=self.splits.num_classes)
        return counts / max(counts.sum(), 1)


def load_client_data(cfg: RunConfig, partition_id: int, num_partitions: int,
                     rows: np.ndarray | None = None) -> ClientData:
    """The private training partition of client ``partition_id`` and the shared splits,
    ready for the client's model (tokenized once per process for text, then cached).

    ``rows``: the partition's rows of the training pool (:attr:`ClientData.rows`) when the
    caller kept them from an earlier call with the same config: a SuperNode starts a
    process for every message, and drawing the partitions (flwr-datasets' import and
    the draw) costs each ~1 s of CPU. Rows that do not fit the pool are drawn again."""
    return _load_client_data(cfg, partition_id, num_partitions,
                             None if rows is None else np.asarray(rows, np.int64).tobytes())


@lru_cache(maxsize=4)
def _load_client_data(cfg: RunConfig, partition_id: int, num_partitions: int,
                      kept_rows: bytes | None) -> ClientData:
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node-config 'partition-id' = {partition_id} must be in [0, {num_partitions})"
        )
    splits = load_splits(cfg)
    rows = None if kept_rows is None else np.frombuffer(kept_rows, np.int64)
    if rows is None or len(rows) == 0 or rows.min() < 0 or rows.max() >= len(splits.train.y):
        rows = partition_indices(splits.train.y, num_partitions, cfg, splits.train_groups)[partition_id]
    local_test = None
    if splits.train_groups is not None and splits.test_groups is not None:
        mine = np.isin(splits.test_groups, np.unique(splits.train_groups[rows]))
        if mine.any():
            local_test = splits.test.take(np.flatnonzero(mine))
    model = cfg.model_for_partition(partition_id)
    return ClientData(
        train=_for_model(splits.train.take(rows), splits, model),
        reference=_shared_for_model(splits, "reference", model),
        test=_shared_for_model(splits, "test", model),
        splits=splits,
        local_test=None if local_test is None else _for_model(local_test, splits, model),
        transfer=None if splits.transfer is None else _shared_for_model(splits, "transfer", model),
        rows=rows,
    )


def _for_model(data: ArrayDataset, splits: CentralSplits, model: str) -> ArrayDataset:
    """``data`` as ``model`` reads it: tokenized for text, as is for images."""
    if not splits.is_text:
        return data
    encode = encoder_for(model, splits.vocab, splits.text_length)
    return ArrayDataset(encode(data.x), data.y, data.num_classes)


def shared_split(splits: CentralSplits, part: str, model: str) -> ArrayDataset:
    """The shared split ``part`` (``"reference"`` or ``"test"``) as ``model`` reads it
    (tokenized for text), once per process."""
    return _shared_for_model(splits, part, model)


@lru_cache(maxsize=8)
def _shared_for_model(splits: CentralSplits, part: str, model: str) -> ArrayDataset:
    """``splits.<part>`` (reference, test or transfer) for ``model``, once per process: every
    client of that architecture in a simulation worker shares it."""
    return _for_model(getattr(splits, part), splits, model)
