"""The paper's datasets, loaded from the real copies in ../shared/datasets, and models."""

import numpy as np
import pytest
import torch

from kta_flwr.config import ConfigError, RunConfig
from kta_flwr.task.splits import load_client_data, load_splits
from kta_flwr.task.datasets import DATASETS
from kta_flwr.task.models import build_model, num_parameters
from kta_flwr.task.text import UNK, build_vocab, encode, tokenize

PATHS = {
    "cifar10": "cifar10",
    "femnist": "femnist/femnist_leaf_niid05_wenzhu.npz",
    "agnews": "ag_news",
    "emnist": "emnist_letters",
}
SHAPES = {"cifar10": (3, 32, 32), "femnist": (1, 28, 28), "agnews": (32,), "emnist": (1, 28, 28)}
CLASSES = {"cifar10": 10, "femnist": 62, "agnews": 4, "emnist": 26}


def _cfg(root, dataset, **kw) -> RunConfig:
    base = dict(
        dataset=dataset, data_path=str(root / PATHS[dataset]), reference_size=200,
        test_size=150, max_train_size=800, text_length=32,
        models="textbag" if dataset == "agnews" else "mlp",
        partitioner="natural" if dataset == "femnist" else "dirichlet",
    )
    base.update(kw)
    return RunConfig(**base)


def _hashes(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def _duplicates(cfg: RunConfig) -> set[bytes]:
    """Inputs that occur more than once in the raw dataset (train and test together)."""
    src = DATASETS[cfg.dataset](cfg.data_path)
    rows = [r.tobytes() for part in (src.train, src.test) if part is not None for r in part.x]
    seen, dupes = set(), set()
    for row in rows:
        (dupes if row in seen else seen).add(row)
    return dupes


@pytest.mark.parametrize("dataset", sorted(PATHS))
def test_loader_shapes_labels_and_disjoint_splits(shared_datasets, dataset):
    cfg = _cfg(shared_datasets, dataset)
    splits = load_splits(cfg)
    assert splits.input_shape == SHAPES[dataset] and splits.num_classes == CLASSES[dataset]
    assert len(splits.reference.y) == 200 and len(splits.train.y) == 800
    for part in (splits.train, splits.reference, splits.test):
        assert part.y.min() >= 0 and part.y.max() < CLASSES[dataset]
        assert part.x.dtype == (object if dataset == "agnews" else np.float32)
    ready = load_client_data(cfg, 0, 4)
    for part in (ready.train, ready.reference, ready.test):
        assert part.x.shape[1:] == SHAPES[dataset]
        assert part.x.dtype == (np.int64 if dataset == "agnews" else np.float32)
    if dataset != "agnews":  # (token rows of short texts can coincide)
        # Real data holds a few identical images (e.g. blank FEMNIST cells): only those
        # may appear in two splits.
        dupes = _duplicates(cfg)
        pool, ref, test = (_hashes(p.x) for p in (splits.train, splits.reference, splits.test))
        assert (pool & ref) | (pool & test) | (ref & test) <= dupes
    clients = [load_client_data(cfg, k, 4).train for k in range(4)]
    rows = [_hashes(c.x) for c in clients] if dataset != "agnews" else None
    assert sum(len(c.y) for c in clients) == 800
    if rows:
        assert all(not rows[i] & rows[j] for i in range(4) for j in range(i + 1, 4))


def test_femnist_writers_stay_whole(shared_datasets):
    cfg = _cfg(shared_datasets, "femnist", max_train_size=0, test_size=0, reference_size=500)
    splits = load_splits(cfg)
    data = [load_client_data(cfg, k, 5) for k in range(5)]
    from kta_flwr.task.splits import partition_indices  # pylint: disable=import-outside-toplevel

    parts = partition_indices(splits.train.y, 5, cfg, splits.train_groups)
    owners = [set(splits.train_groups[rows]) for rows in parts]
    assert all(not owners[i] & owners[j] for i in range(5) for j in range(i + 1, 5))
    assert set().union(*owners) == set(splits.train_groups)
    # every test row belongs to a client writer, and each client's local test is its own
    assert set(splits.test_groups) <= set(splits.train_groups)
    assert sum(len(d.local_test.y) for d in data) == len(splits.test.y)
    # reference writers are nobody's: their rows are absent from the pool
    assert not (_hashes(splits.reference.x) & _hashes(splits.train.x)) - _duplicates(cfg)


def test_agnews_vocabulary_from_training_split_only():
    texts = ["Stocks rally on Wall Street", "stocks fall; street calm"]
    vocab = build_vocab(texts, max_size=10)
    assert tokenize("Wall-Street's 2nd") == ["wall", "street", "s", "2nd"]
    ids = encode(["stocks zebra"], vocab, length=4)
    assert ids.shape == (1, 4) and ids[0, 1] == UNK and ids[0, 0] == vocab.index("stocks") + 2
    assert ids[0, 2:].tolist() == [0, 0]


def test_missing_data_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data-path"):
        load_splits(RunConfig(dataset="cifar10", data_path=str(tmp_path / "nowhere"), models="simplecnn"))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"dataset": "agnews", "models": "mlp"}, "models"),
        ({"dataset": "digits", "models": "textbag"}, "models"),
        ({"partitioner": "natural"}, "natural"),
    ],
)
def test_bad_dataset_model_combinations(changes, key):
    with pytest.raises(ConfigError, match=key):
        load_client_data(RunConfig().replace(**changes), 0, 2)


@pytest.mark.parametrize(
    ("name", "shape", "classes", "vocab", "params"),
    [
        ("simplecnn", (3, 32, 32), 10, 0, 62_006),
        ("resnet18", (3, 32, 32), 10, 0, 11_173_962),
        ("femnist_cnn", (1, 28, 28), 62, 0, 871_102),
        ("textbag", (64,), 4, 20_000, 20_000 * 64 + 64 * 4 + 4),
        ("mlp", (1, 8, 8), 10, 0, 301_066),
    ],
)
def test_models_forward_and_size(name, shape, classes, vocab, params):
    from kta_flwr.task.models import ModelSpec  # pylint: disable=import-outside-toplevel

    model = build_model(name, ModelSpec(shape, classes, vocab), seed=0)
    assert num_parameters(model) == params
    x = torch.randint(0, vocab, (2, *shape)) if vocab else torch.randn(2, *shape)
    assert model.eval()(x).shape == (2, classes)


def test_minilm_offline_partial_finetuning_mixed_with_textbag(shared_datasets):
    """MiniLM loads offline, trains only its head + last layer, and shares the reference
    set (same fingerprint, same labels) with a textbag client that tokenizes differently."""
    cfg = _cfg(shared_datasets, "agnews", models="minilm,textbag", max_train_size=100,
               reference_size=50, test_size=50)
    minilm_client, textbag_client = load_client_data(cfg, 0, 2), load_client_data(cfg, 1, 2)
    assert minilm_client.splits.reference_fingerprint == textbag_client.splits.reference_fingerprint
    assert (minilm_client.reference.y == textbag_client.reference.y).all()
    assert minilm_client.reference.x[0, 0] == 101  # [CLS]
    assert not (minilm_client.reference.x == textbag_client.reference.x).all()
    model = build_model("minilm", minilm_client.splits.spec_for(cfg), seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert total == 22_713_216 + 384 * 4 + 4
    one_layer = sum(p.numel() for p in model.encoder.encoder.layer[-1].parameters())
    assert num_parameters(model) == one_layer + 384 * 4 + 4
    logits = model.eval()(torch.as_tensor(minilm_client.reference.x[:3]))
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
