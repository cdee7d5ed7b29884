"""Checkpoints, the server's run state, the node-wait deadline and the market's memory of
absent and restarted nodes: the parts of fault handling that need no Flower process."""

import json
import os
import platform
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import flwr
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from kta_flwr.config import ConfigError, RunConfig
from kta_flwr.factory import market_params
from kta_flwr.flower import protocol
from kta_flwr.flower.metering import ByteMeter, Traffic
from kta_flwr.flower.results import RunRecorder
from kta_flwr.flower.run_state import RunState, check_resumable, load_run_state, save_run_state
from kta_flwr.flower.strategies.base import FederationError, wait_for_nodes
from kta_flwr.flower.strategies.market import KnowledgeMarket
from kta_flwr.task.checkpoint import (
    CheckpointError,
    ModelMeta,
    checkpoint_file,
    load_personalized,
    read_checkpoint,
    save_checkpoint,
)
from kta_flwr.task.models import ModelSpec, build_model
from kta_flwr.flower.validation import Checked
from tests.conftest import FixedGrid, client_metrics, model_meta, reply, train_round

SPEC = ModelSpec((1, 8, 8), 10)


def _meta(round_: int = 1, **changes) -> ModelMeta:
    return model_meta(round=round_, rounds_trained=round_, **changes)


def test_checkpoint_round_trip_keeps_the_previous_round(tmp_path):
    path = checkpoint_file(tmp_path, "kta")
    first, second = build_model("cnn", SPEC, 1), build_model("cnn", SPEC, 2)
    save_checkpoint(path, _meta(1), first.state_dict(), {"residual": np.arange(3, dtype=np.float32)})
    save_checkpoint(path, _meta(2), second.state_dict())
    assert read_checkpoint(path).meta.round == 2
    previous = read_checkpoint(checkpoint_file(tmp_path, "kta", previous=True))
    assert previous.meta.round == 1 and previous.extra["residual"].tolist() == [0, 1, 2]
    loaded = load_personalized(tmp_path, {"architecture": "cnn", "fingerprint": "f" * 16})
    x = torch.zeros(2, 1, 8, 8)
    second.eval()
    torch.testing.assert_close(loaded(x), second(x))
    assert not loaded.training


@pytest.mark.parametrize(("field", "value"), [("architecture", "mlp"), ("fingerprint", "0" * 16),
                                               ("num_classes", 62), ("input_shape", (1, 28, 28))])
def test_a_mismatched_checkpoint_is_refused_naming_the_field(tmp_path, field, value):
    path = checkpoint_file(tmp_path, "kta")
    save_checkpoint(path, _meta(), build_model("cnn", SPEC, 0).state_dict())
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        load_personalized(path, {field: value})


def test_broken_or_ambiguous_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "kta.pt", _meta(), build_model("cnn", SPEC, 0).state_dict())
    with pytest.raises(CheckpointError, match="2 checkpoints"):
        load_personalized(tmp_path)


def test_predict_cli_and_its_refusals(tmp_path):
    save_checkpoint(checkpoint_file(tmp_path, "kta"), _meta(), build_model("cnn", SPEC, 0).state_dict())
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 8, 8), np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((3, 64), np.float32))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "kta_flwr.tools.predict", "--model",
                               str(tmp_path), *args], capture_output=True, text=True, check=False)

    ok = cli("--input", str(tmp_path / "x.npy"))
    assert ok.returncode == 0 and len(ok.stdout.split()) == 3
    wrong = cli("--input", str(tmp_path / "x.npy"), "--expect", "architecture=mlp")
    assert wrong.returncode == 2 and "'architecture'" in wrong.stderr
    shape = cli("--input", str(tmp_path / "bad.npy"))
    assert shape.returncode == 2 and "'input_shape'" in shape.stderr


def test_run_state_round_trip_and_resume_checks(tmp_path):
    traffic = Traffic()
    traffic.add("train", "up", 5, RecordDict({"a": ArrayRecord({"v": Array(np.zeros(3, np.float32))})}))
    random.seed(3)
    state = RunState.capture(round=2, lineage=11, config=RunConfig().to_flwr(), strategy={"x": 1},
                             recorder={"meter": traffic.state()})
    expected = random.random()
    save_run_state(tmp_path, state)
    loaded = load_run_state(tmp_path)
    loaded.restore_rngs()
    assert random.random() == expected
    back = Traffic.from_state(loaded.recorder["meter"])
    assert back.total("up") == 12 and back.per_node[5]["up"] == 12 and back.manifest == traffic.manifest
    check_resumable(loaded.config, RunConfig(num_server_rounds=20, round_timeout=5.0), 2)
    with pytest.raises(ConfigError, match="'seed'"):
        check_resumable(loaded.config, RunConfig(seed=1), 2)
    with pytest.raises(ConfigError, match="'num-server-rounds'"):
        check_resumable(loaded.config, RunConfig(num_server_rounds=1), 2)
    older = {k: v for k, v in loaded.config.items() if k != "label-share"}  # saved before the key
    with pytest.raises(ConfigError, match=r"'label-share' = 0.1 differs from the run being resumed \(0.0\)"):
        check_resumable(older, RunConfig(), 2)
    check_resumable(older, RunConfig(label_share=0.0), 2)
    with pytest.raises(ConfigError, match="'resume-from'"):
        load_run_state(tmp_path / "nowhere")


def test_results_say_where_each_run_of_a_resumed_run_ran(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path))
    first = RunRecorder(cfg, ByteMeter(), run_id=1)
    env = first.environments[0]
    assert env["versions"]["flwr"] == flwr.__version__ and env["cpu_count"] == os.cpu_count()
    assert env["cpu"] and env["python"] == platform.python_version()
    resumed = RunRecorder(cfg, ByteMeter(), run_id=2, run_dir=tmp_path / "run")
    resumed.restore(first.state())
    written = json.loads((resumed.write() / "results.json").read_text())
    assert written["run_ids"] == [1, 2] and len(written["environments"]) == 2
    older = {k: v for k, v in first.state().items() if k != "environments"}  # before they were kept
    resumed.restore(older)
    assert resumed.environments[0] == {} and resumed.environments[1]["versions"] == env["versions"]


def test_waiting_for_nodes_has_a_deadline():
    grid = FixedGrid([4, 2, 9])
    assert wait_for_nodes(grid, 3, 0.0, 1) == [2, 4, 9]
    assert wait_for_nodes(grid, 5, 0.0, 3) == [2, 4, 9]  # after the deadline, with a quorum
    with pytest.raises(FederationError, match="only 3 node"):
        wait_for_nodes(grid, 5, 0.0, 4)


def _logits_reply(node_id: int, partition: int, values: np.ndarray):
    return reply(node_id, RecordDict({
        protocol.LOGITS: ArrayRecord({protocol.VALUES: Array(values)}),
        protocol.METRICS: client_metrics(partition),
    }))


@pytest.mark.usefixtures("server_identity")
def test_market_forgets_stale_logits_and_follows_a_restarted_node():
    n, c = 12, 3
    rng = np.random.default_rng(0)
    strategy = KnowledgeMarket(
        params=market_params(RunConfig(distill_gate=False)), reference_labels=rng.integers(0, c, n),
        num_classes=c, fingerprint="abc", max_staleness=1,
        evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord({}),
    )

    def logits():
        return rng.normal(size=(n, c)).astype(np.float32)

    train_round(strategy, 1, [_logits_reply(10 + p, p, logits()) for p in range(3)])
    # round 2: partition 2 is absent; its round-1 logits are used once, counted as stale
    _, metrics = train_round(strategy, 2, [_logits_reply(10 + p, p, logits()) for p in range(2)])
    assert metrics["market-clients"] == 3 and metrics["market-stale"] == 1
    # round 3: still absent -> older than max-staleness, dropped from the bank
    _, metrics = train_round(strategy, 3, [_logits_reply(10 + p, p, logits()) for p in range(2)])
    assert metrics["market-clients"] == 2 and 12 not in strategy.bank
    # partition 1 comes back as node 21: it takes over node 11's pending targets
    pending = strategy.targets[11]
    strategy.observe(Checked(21, _logits_reply(21, 1, logits()), {"partition-id": 1}, {}))
    assert 11 not in strategy.targets and np.array_equal(strategy.targets[21], pending)
    assert strategy.partition_of == {10: 0, 12: 2, 21: 1}
