"""Shared fixtures and helpers: the app directory, a results reader, Flower replies, a
node driven through the real ClientApp functions."""

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

# One torch/BLAS thread per process: four pytest-xdist workers share two cores, and the
# Flower processes a test starts (ServerApp, Ray actors) inherit this. Idle OpenMP threads
# that spin while the cores are taken cost ~3 s of CPU per small run. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# pylint: disable=wrong-import-position
import numpy as np
import pytest
from flwr.app import (
    ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata, MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import evaluate, train
from kta_flwr.config import parse_run_config
from kta_flwr.flower import protocol
from kta_flwr.tools.federation import stage_app

if TYPE_CHECKING:
    from kta_flwr.task.checkpoint import ModelMeta

APP_DIR = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``slow`` tests (real Flower processes, minutes each) first, in their files'
    order: under pytest-xdist as CI runs it (``-n 4 --dist load --maxschedchunk 1``: a
    worker that finishes a test takes the next one) the long runs start first and the
    many fast tests fill the workers' gaps after them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Flower app: what its FAB holds, staged once per test process
    (:func:`kta_flwr.tools.federation.stage_app`; the repository root with its ``.venv``
    costs every federation ~5 s of CPU to walk)."""
    return stage_app(APP_DIR, tmp_path_factory.mktemp("app"))


def read_results(output_dir: Path) -> list[dict]:
    """All ``results.json`` under ``output_dir``, oldest first."""
    return [json.loads(p.read_text()) for p in sorted(output_dir.glob("*/results.json"))]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` (or ``$KTA_DATASETS``): real data for loader tests.

    Skips when absent; with ``KTA_REQUIRE_DATASETS=1`` (set by ``.ci/run``) it fails instead.
    """
    path = Path(os.environ.get("KTA_DATASETS", APP_DIR.parent / "shared" / "datasets"))
    if not path.is_dir():
        reason = f"real datasets not found at {path} (set KTA_DATASETS to their folder)"
        if os.environ.get("KTA_REQUIRE_DATASETS") == "1":
            pytest.fail(reason + "; KTA_REQUIRE_DATASETS=1 makes them mandatory")
        pytest.skip(reason)
    return path.resolve()


@pytest.fixture
def server_identity():
    """Messages are created inside a ServerApp run; give this process that identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def reply(node_id: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    """A real Flower reply message, as the SuperLink delivers it from ``node_id``."""
    metadata = Metadata(
        run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=0,
        reply_to_message_id=f"m{node_id}", group_id="", created_at=0.0, ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    if error is not None:
        return Message(error=Error(code=0, reason=error), metadata=metadata)
    return Message(content=content, metadata=metadata)


def client_metrics(partition: int = 0, examples: int = 5, **extra: float) -> MetricRecord:
    """The train metrics an honest ClientApp sends (every key the boundary requires)."""
    return MetricRecord({"num-examples": examples, "partition-id": partition, "train-loss": 0.5,
                         "samples": examples, "t-setup": 0.1, "t-restore": 0.1, "t-stage1": 0.1,
                         "t-save": 0.1, **extra})


def train_round(strategy, server_round: int, replies: list[Message], asked=None):
    """``aggregate_train`` of ``server_round`` after telling the strategy's screen that
    ``asked`` (default: every sender) got a train instruction, as ``configure_train`` does."""
    strategy.screen.expect("train", asked if asked is not None else {m.metadata.src_node_id for m in replies})
    return strategy.aggregate_train(server_round, replies)


class FixedGrid:
    """The Grid calls our strategies make to sample and to ask nodes their partition,
    over a fixed set of node ids: node ``node_ids[i]`` holds partition ``i`` and answers
    a query as the ClientApp does."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids

    def send_and_receive(self, messages, *, timeout=None):
        del timeout
        return [reply(m.metadata.dst_node_id,
                      RecordDict({"metrics": MetricRecord({"partition-id": self.node_ids.index(m.metadata.dst_node_id)})}))
                for m in messages]


NODE_BASE = {"num-server-rounds": 3, "local-epochs": 1, "batch-size": 32, "learning-rate": 0.05,
        "reference-size": 100, "test-size": 100, "models": "mlp", "seed": 3}


class FakeNode:
    """One SuperNode's Context over the rounds (its state carries from call to call)."""

    def __init__(self, tmp_path, strategy: str, partition: int = 1, **config: object) -> None:
        config = {key.replace("_", "-"): value for key, value in config.items()}
        self.cfg = parse_run_config({**NODE_BASE, "strategy": strategy, **config})
        self.context = Context(
            run_id=7, node_id=11, state=RecordDict(), run_config=self.cfg.to_flwr(),
            node_config={"partition-id": partition, "num-partitions": 4,
                         "model-dir": str(tmp_path / strategy / str(partition))},
        )

    @staticmethod
    def message(kind: str, server_round: int, arrays: dict | None = None) -> Message:
        """A train or evaluate instruction as the server sends it."""
        content = RecordDict({protocol.CONFIG: ConfigRecord({"server-round": server_round})})
        if arrays is not None:
            content["arrays"] = ArrayRecord(arrays)
        message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
        return Message(content, dst_node_id=11, message_type=message_type)

    def call(self, kind: str, server_round: int, arrays: dict | None = None) -> Message:
        """The ClientApp's reply to that instruction."""
        msg = self.message(kind, server_round, arrays)
        return (train if kind == "train" else evaluate)(msg, self.context)

    def personal(self) -> dict[str, np.ndarray]:
        record = self.context.state.array_records["personal-model"]
        return {k: v.numpy() for k, v in record.items()}


def model_meta(**changes: object) -> "ModelMeta":
    """Checkpoint metadata of a small CNN on 1x8x8 inputs, 10 classes (round 1 of run 7)."""
    from kta_flwr.task.checkpoint import ModelMeta  # pylint: disable=import-outside-toplevel

    values = dict(architecture="cnn", num_classes=10, input_shape=(1, 8, 8), vocab_size=0,
                  finetune_layers=1, fingerprint="f" * 16, strategy="kta", partition_id=0,
                  run_id=7, lineage=7, round=1, rounds_trained=1)
    return ModelMeta(**{**values, **changes})
