"""Dataset loaders: files on disk (or scikit-learn's bundled digits) -> :class:`Source`.

Each loader takes the run config's ``data-path`` (a file or a folder) and returns the raw
material every node splits identically (see :mod:`kta_flwr.task.splits`). Loaders never download:
a missing path raises :class:`~kta_flwr.config.ConfigError` saying where to put the data.

Supported formats (the copies in ``../shared/datasets`` and the official releases):

========== =====================================================================
dataset    ``data-path``
========== =====================================================================
digits     ignored (ships with scikit-learn)
cifar10    ``cifar10_prefix_subset.npz`` (or a folder holding it), or the official
           ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``)
femnist    an npz with ``x/y/writer_{train,test}`` (or a folder of them: the first by
           name is used), or a LEAF folder with ``train/*.json`` and ``test/*.json``
agnews     a folder with ``test.csv[.xz]`` and optionally ``train.csv[.xz]``
           (``ag_news_csv``); without ``train.csv`` the test rows are the only data
emnist     ``emnist_letters.npz`` (or a folder holding it)
========== =====================================================================

Online users may instead write ``data-path = "hub"`` (or ``"hub:<owner>/<name>"``) to load
the public Hugging Face copy through flwr-datasets (:data:`HUB_NAMES`); that is the only
code path that touches the network, and only when asked to.
"""

from __future__ import annotations

import csv
import io
import json
import lzma
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kta_flwr.config import DATASETS as DATASET_NAMES
from kta_flwr.config import ConfigError, check_registry

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs ``x`` (``[M, *input_shape]``) and integer labels ``y`` (``[M]``).

    ``x`` is float32 for images and an object array of strings for text (tokenized later,
    with a vocabulary built from the training split only).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def take(self, rows: np.ndarray) -> ArrayDataset:
        """The rows ``rows`` (in the given order)."""
        return ArrayDataset(self.x[rows], self.y[rows], self.num_classes)


@dataclass(frozen=True)
class Source:
    """What a loader returns.

    ``test`` is the dataset's official test split, or None when the test set must be
    carved out of ``train``. ``train_groups``/``test_groups`` are natural ids (FEMNIST
    writers) for ``partitioner = "natural"``.
    """

    train: ArrayDataset
    test: ArrayDataset | None = None
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None

    @property
    def is_text(self) -> bool:
        """True when the inputs are raw strings."""
        return self.train.x.dtype == object


def _missing(dataset: str, path: str, expected: str) -> ConfigError:
    return ConfigError(
        f"dataset {dataset!r}: no data at run-config 'data-path' = {path!r}; expected "
        f"{expected}. Nothing is downloaded: put a copy there (e.g. "
        f"../shared/datasets/{dataset}) and pass its absolute path, e.g. "
        f"--run-config \"data-path='/abs/path'\""
    )


def _locate(dataset: str, data_path: str, names: tuple[str, ...], expected: str) -> Path:
    """``data_path`` itself if it is a file, else the first of ``names`` inside it."""
    if not data_path:
        raise _missing(dataset, data_path, expected)
    path = Path(data_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            hits = sorted(path.glob(name))
            if hits:
                return hits[0]
    raise _missing(dataset, data_path, expected)


def _images(x: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[M, H, W]`` or ``[M, H, W, 3]`` -> float32 ``[M, C, H, W]`` in [0, 1], normalised."""
    x = x.astype(np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    if mean is not None and std is not None:
        x = (x - mean[None, :, None, None]) / std[None, :, None, None]
    return np.ascontiguousarray(x)


#: Public hub copies (flwr-datasets / Hugging Face) and their column names:
#: (name, input column, label column, writer column or None).
HUB_NAMES: dict[str, tuple[str, str, str, str | None]] = {
    "cifar10": ("uoft-cs/cifar10", "img", "label", None),
    "agnews": ("fancyzhx/ag_news", "text", "label", None),
    "femnist": ("flwrlabs/femnist", "image", "character", "writer_id"),
}


def load_from_hub(dataset: str, data_path: str) -> Source:
    """The public copy of ``dataset`` through flwr-datasets (needs internet or a warm
    Hugging Face cache). Splits the hub provides are used as they are; without a test
    split the test set is carved out of ``train``."""
    if dataset not in HUB_NAMES:
        raise ConfigError(f"run-config 'data-path' = 'hub': no hub copy known for {dataset!r}")
    default, x_col, y_col, group_col = HUB_NAMES[dataset]
    name = data_path.partition(":")[2] or default
    from flwr_datasets import FederatedDataset  # pylint: disable=import-outside-toplevel

    try:
        fds = FederatedDataset(dataset=name, partitioners={"train": 1}, shuffle=False)
        parts = {"train": fds.load_split("train")}
        try:
            parts["test"] = fds.load_split("test")
        except ValueError:
            pass
    except Exception as err:  # pylint: disable=broad-except  # offline, unknown name, ...
        raise ConfigError(
            f"run-config 'data-path' = {data_path!r}: could not load {name!r} from the "
            f"hub ({type(err).__name__}: {str(err)[:200]}); offline, pass a local path"
        ) from None
    num_classes = {"cifar10": 10, "agnews": 4, "femnist": 62}[dataset]

    def convert(table) -> tuple[ArrayDataset, np.ndarray | None]:
        y = np.asarray(table[y_col], np.int64)
        if dataset == "agnews":
            x = np.asarray(table[x_col], dtype=object)
        else:
            raw = np.stack([np.asarray(img, np.uint8) for img in table[x_col]])
            x = _images(raw, CIFAR10_MEAN, CIFAR10_STD) if dataset == "cifar10" else _images(raw)
        groups = np.asarray(table[group_col]).astype(str) if group_col else None
        return ArrayDataset(x, y, num_classes), groups

    train, train_groups = convert(parts["train"])
    test, test_groups = convert(parts["test"]) if "test" in parts else (None, None)
    return Source(train, test, train_groups, test_groups)


def load_digits(data_path: str) -> Source:
    """scikit-learn's bundled handwritten digits: 1,797 images, 1x8x8 in [0, 1], 10 classes.

    Ships with scikit-learn, so it works offline; ``data_path`` is ignored.
    """
    del data_path
    from sklearn.datasets import load_digits as sk_digits  # pylint: disable=import-outside-toplevel

    bunch = sk_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    return Source(ArrayDataset(x=x, y=bunch.target.astype(np.int64), num_classes=10))


def load_cifar10(data_path: str) -> Source:
    """CIFAR-10 as float32 ``[M, 3, 32, 32]``, normalised per channel; 10 classes."""
    expected = "cifar10_prefix_subset.npz or the official cifar-10-batches-py folder"
    root = Path(data_path).expanduser() if data_path else None
    for batches in ([root, root / "cifar-10-batches-py"] if root and root.is_dir() else []):
        if (batches / "data_batch_1").is_file():
            return _cifar10_batches(batches)
    npz = np.load(_locate("cifar10", data_path, ("cifar10*.npz", "*.npz"), expected))
    train = ArrayDataset(
        _images(npz["x_train"], CIFAR10_MEAN, CIFAR10_STD), npz["y_train"].astype(np.int64), 10
    )
    test = ArrayDataset(
        _images(npz["x_test"], CIFAR10_MEAN, CIFAR10_STD), npz["y_test"].astype(np.int64), 10
    )
    return Source(train, test)


def _cifar10_batches(folder: Path) -> Source:
    def read(names: list[str]) -> ArrayDataset:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], np.int64))
        x = np.concatenate(xs).transpose(0, 2, 3, 1)
        return ArrayDataset(_images(x, CIFAR10_MEAN, CIFAR10_STD), np.concatenate(ys), 10)

    return Source(read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"]))


#: Where a FEMNIST npz is looked for inside a folder, in order.
_FEMNIST_FILES = ("femnist*.npz", "*.npz")


def load_femnist(data_path: str) -> Source:
    """FEMNIST (LEAF) as float32 ``[M, 1, 28, 28]`` in [0, 1], 62 classes, writer ids.

    Only test rows of writers that also have training rows are kept (the others cannot be
    anyone's local test data).
    """
    root = Path(data_path).expanduser() if data_path else None
    if root and root.is_dir() and (root / "train").is_dir() and (root / "test").is_dir():
        train, train_groups = _leaf_json(root / "train")
        test, test_groups = _leaf_json(root / "test")
    else:
        npz = np.load(_locate("femnist", data_path, _FEMNIST_FILES, "an npz with x_train/y_train/writer_train or a LEAF folder"))
        train = ArrayDataset(_images(npz["x_train"]), npz["y_train"].astype(np.int64), 62)
        test = ArrayDataset(_images(npz["x_test"]), npz["y_test"].astype(np.int64), 62)
        train_groups, test_groups = npz["writer_train"].astype(str), npz["writer_test"].astype(str)
    keep = np.flatnonzero(np.isin(test_groups, np.unique(train_groups)))
    return Source(train, test.take(keep), train_groups, test_groups[keep])


def _femnist_inputs(data_path: str) -> tuple[np.ndarray, np.ndarray]:
    """FEMNIST's training images ``[M, 1, 28, 28]`` and writer ids ``[M]``, no labels: of
    an npz only ``x_train`` and ``writer_train`` are read (a LEAF folder's JSON shards
    hold them with the labels; those are dropped)."""
    root = Path(data_path).expanduser()
    if root.is_dir() and (root / "train").is_dir():
        train, writers = _leaf_json(root / "train")
        return train.x, writers
    npz = np.load(_locate("femnist", data_path, _FEMNIST_FILES, "an npz with x_train/writer_train"))
    return _images(npz["x_train"]), npz["writer_train"].astype(str)


def _leaf_json(folder: Path) -> tuple[ArrayDataset, np.ndarray]:
    xs, ys, writers = [], [], []
    for shard in sorted(folder.glob("*.json")):
        blob = json.loads(shard.read_text())
        for user in blob["users"]:
            rows = blob["user_data"][user]
            xs.append(np.asarray(rows["x"], np.float32).reshape(-1, 1, 28, 28))
            ys.append(np.asarray(rows["y"], np.int64))
            writers.extend([user] * len(rows["y"]))
    if not xs:
        raise _missing("femnist", str(folder), "LEAF json shards")
    return ArrayDataset(np.concatenate(xs), np.concatenate(ys), 62), np.asarray(writers)


def load_emnist_letters(data_path: str) -> Source:
    """EMNIST Letters as float32 ``[M, 1, 28, 28]``, upright, labels 0..25 (A..Z)."""
    npz = np.load(_locate("emnist", data_path, ("emnist_letters.npz", "*.npz"), "emnist_letters.npz"))

    def part(split: str) -> ArrayDataset:
        upright = npz[f"x_{split}"].transpose(0, 2, 1)  # the idx files store images transposed
        return ArrayDataset(_images(upright), npz[f"y_{split}"].astype(np.int64) - 1, 26)

    return Source(part("train"), part("test"))


def load_agnews(data_path: str) -> Source:
    """AG News (``ag_news_csv``): text = title + description, 4 classes (labels 0..3).

    Without ``train.csv`` (the copy in ``../shared/datasets`` has only the complete test
    split) the test rows are the whole dataset and the test set is carved out of them.
    """
    expected = "a folder with test.csv or test.csv.xz (ag_news_csv format)"
    root = Path(data_path).expanduser() if data_path else Path("")
    if not data_path or not root.is_dir():
        raise _missing("agnews", data_path, expected)

    def read(stem: str) -> ArrayDataset | None:
        for name, opener in ((f"{stem}.csv", open), (f"{stem}.csv.xz", lzma.open)):
            if (root / name).is_file():
                with opener(root / name, "rt", encoding="utf-8", newline="") as fh:
                    rows = list(csv.reader(io.StringIO(fh.read())))
                y = np.asarray([int(r[0]) - 1 for r in rows], np.int64)
                x = np.asarray([f"{r[1]} {r[2]}".replace("\\n", " ") for r in rows], dtype=object)
                return ArrayDataset(x, y, 4)
        return None

    train, test = read("train"), read("test")
    if test is None:
        raise _missing("agnews", data_path, expected)
    if train is None:
        return Source(test, None)
    return Source(train, test)


def load_transfer_inputs(source: str, path: str, input_shape: tuple[int, ...],
                         task_images: np.ndarray, task_writers: np.ndarray | None = None) -> np.ndarray:
    """The inputs of an external transfer set (no labels are read): float32
    ``[M, *input_shape]``.

    Args:
        source: ``"emnist"`` (EMNIST Letters' training images, upright), ``"femnist"``
            (the training images of another FEMNIST sample, as ``data-path`` reads one,
            less every writer of ``task_writers``; its labels are not kept) or ``"file"``
            (an ``.npy`` array, or an ``.npz`` with an array ``x``, of inputs exactly as
            the task's models read them: float32, normalised as the task's loader does).
        path: the run config's ``transfer-path``, resolved.
        input_shape: the task's input shape (``[C, H, W]``).
        task_images: some of the task's inputs (its reference set): EMNIST's images
            are inverted when their background (mean border pixel) is the opposite of
            the task's (FEMNIST writes dark on light, EMNIST light on dark).
        task_writers: ``femnist``: the writer ids of the task's own rows (training pool,
            reference and test), none of whose rows may enter the transfer set.

    Raises:
        ConfigError: no file at ``path``, or inputs of another shape, dtype or with
            values that are not finite (naming ``transfer-path``).
    """
    where = f"run-config 'transfer-path' = {path!r} ('transfer-source' = {source!r})"
    try:
        if source == "emnist":
            x = load_emnist_letters(path).train.x
        elif source == "femnist":
            x, writers = _femnist_inputs(path)
            x = x[~np.isin(writers, np.asarray([] if task_writers is None else task_writers, str))]
        else:
            file = Path(path).expanduser()
            if not file.is_file():
                raise ConfigError(f"{where}: no such file; expected an .npy array or an .npz with 'x'")
            loaded = np.load(file, allow_pickle=False)
            x = loaded["x"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except (OSError, ValueError, KeyError) as err:
        expected = {"emnist": "emnist_letters.npz", "femnist": "an npz with x_train/writer_train or a LEAF folder",
                    "file": "an .npy array or an .npz with 'x'"}[source]
        raise ConfigError(f"{where}: cannot be read as {expected} ({err})") from None
    if not np.issubdtype(x.dtype, np.number) or tuple(x.shape[1:]) != tuple(input_shape):
        raise ConfigError(f"{where} holds {x.dtype} inputs of shape {list(x.shape[1:])}; the task's "
                          f"models read float32 inputs of shape {list(input_shape)}")
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all():
        raise ConfigError(f"{where} holds values that are not finite")
    if source == "emnist" and abs(_border_mean(x) - _border_mean(task_images)) > 0.5:
        x = 1.0 - x
    return x


def _border_mean(images: np.ndarray) -> float:
    """Mean of the outermost pixels of ``[M, C, H, W]`` images (at most 1,000 of them)."""
    sample = images[:1000]
    border = np.concatenate([sample[..., 0, :], sample[..., -1, :], sample[..., :, 0], sample[..., :, -1]],
                            axis=-1)
    return float(border.mean())


#: Dataset name -> loader taking the run config's ``data-path``.
DATASETS: dict[str, Callable[[str], Source]] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
    "femnist": load_femnist,
    "agnews": load_agnews,
    "emnist": load_emnist_letters,
}
check_registry("dataset", DATASETS, DATASET_NAMES)
