"""The one server seam (kta_flwr.flower.strategies.base.NodeStrategy): every strategy the
factory builds implements it, its saved state survives the checkpoint format, it stamps
the lineage, waits for missing nodes once per round, reports the nodes' notes, and a
node the SuperLink lost is counted once, under its own id."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from kta_flwr.config import STRATEGIES, RunConfig
from kta_flwr.factory import build_strategy, node_options
from kta_flwr.flower import protocol
from kta_flwr.flower.grids import attribute_lost
from kta_flwr.flower.metering import ByteMeter
from kta_flwr.flower.results import RunRecorder
from kta_flwr.flower.strategies.base import NodeStrategy
from kta_flwr.flower.validation import TRAIN, ReplyScreen, ReplySpec, train_metrics
from kta_flwr.storage import read_state, write_state
from kta_flwr.task.models import ModelSpec, build_model, head_keys
from tests.conftest import FixedGrid, client_metrics, reply

pytestmark = pytest.mark.usefixtures("server_identity")

SERVER = Path(__file__).resolve().parents[1] / "kta_flwr" / "server"


def _strategy(name: str, tmp_path: Path, num_partitions: int = 0, **changes) -> NodeStrategy:
    cfg = RunConfig(strategy=name, output_dir=str(tmp_path)).replace(**changes)
    model = build_model("mlp", ModelSpec((64,), 10), cfg.seed)
    head = head_keys(model) if cfg.shares_body_only else frozenset()
    arrays = ArrayRecord({k: v for k, v in model.state_dict().items() if k not in head})
    recorder = RunRecorder(cfg, ByteMeter(), run_dir=tmp_path)
    return build_strategy(
        cfg, initial_arrays=ArrayRecord() if cfg.is_market else arrays,
        reference_labels=np.arange(30) % 10, num_classes=10, fingerprint="abc",
        options=node_options(cfg, recorder.aggregate_evaluate, recorder.aggregate_train,
                             max_examples=1000, lineage=41, num_partitions=num_partitions),
        tier_shapes=[{k: tuple(v.shape) for k, v in model.state_dict().items()}],
    )


def test_the_server_asks_strategies_and_never_inspects_their_type():
    found = [f"{p.name}:{i + 1}" for p in SERVER.glob("*.py")
             for i, line in enumerate(p.read_text().splitlines()) if "isinstance" in line]
    assert not found, found


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_stamps_its_lineage_and_saves_its_state(name, tmp_path):
    strategy = _strategy(name, tmp_path)
    assert isinstance(strategy, NodeStrategy)
    start = strategy.start_arrays()
    messages = list(strategy.configure_train(1, start, ConfigRecord({}), FixedGrid([5, 6])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [5, 6]
    assert all(m.content.config_records[protocol.CONFIG][protocol.LINEAGE] == 41 for m in messages)
    strategy.partition_of = {5: 0, 6: 1}
    state = strategy.state_dict()
    write_state(tmp_path / "s.json", state, format_name="t/1")
    fresh = _strategy(name, tmp_path)
    fresh.load_state_dict(read_state(tmp_path / "s.json", format_name="t/1"))
    write_state(tmp_path / "again.json", fresh.state_dict(), format_name="t/1")
    assert _without_arrays(tmp_path / "again.json") == _without_arrays(tmp_path / "s.json")
    assert fresh.partition_of == {5: 0, 6: 1}
    assert [k for k in fresh.start_arrays().keys()] == [k for k in start.keys()]
    keeps = fresh.global_model()
    assert (keeps is not None) == (name in ("fedavg", "fedprox", "fedmedian", "krum", "fedtrimmedavg",
                                            "fedavg-ft", "ditto", "fedavg-topk", "sapef", "heterofl",
                                            "fedavg-common"))


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_leaves_a_newcomer_out_until_its_round(name, tmp_path):
    newcomers = {"newcomer_fraction": 0.3, "newcomer_round": 3}
    (late,) = RunConfig(**newcomers).newcomers(3)
    grid = FixedGrid([5, 6, 7])  # node 5 + p holds partition p
    for server_round, expected in ((2, sorted({5, 6, 7} - {5 + late})), (3, [5, 6, 7])):
        strategy = _strategy(name, tmp_path, num_partitions=3, **newcomers)
        start = strategy.start_arrays()
        trained = strategy.configure_train(server_round, start, ConfigRecord({}), grid)
        assert sorted(m.metadata.dst_node_id for m in trained) == expected
        evaluated = strategy.configure_evaluate(server_round, start, ConfigRecord({}), grid)
        assert sorted(m.metadata.dst_node_id for m in evaluated) == expected


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_takes_one_more_teacher_and_changes_nothing_without_pending_targets(name, tmp_path):
    strategy = _strategy(name, tmp_path)
    write_state(tmp_path / "before.json", strategy.state_dict(), format_name="t/1")
    asked = []
    strategy.blend_teacher(lambda rows, transfer: asked.append(rows) or np.zeros((len(rows), 10)), 0.3)
    write_state(tmp_path / "after.json", strategy.state_dict(), format_name="t/1")
    assert not asked  # nothing pending: the teacher is not even asked
    assert _without_arrays(tmp_path / "after.json") == _without_arrays(tmp_path / "before.json")


def _without_arrays(path: Path) -> str:
    """A state file's JSON without the name of its arrays file (a digest of the arrays)."""
    return re.sub(r'"arrays": \{[^}]*\}', "", path.read_text())


def test_a_missing_node_is_waited_for_once_per_round(tmp_path, caplog):
    """min-nodes 3, two connected: the round's train sampling waits (node-wait-timeout),
    its evaluation does not wait again."""
    strategy = _strategy("kta", tmp_path, min_nodes=3, node_wait_timeout=0.2, min_round_nodes=2)
    grid = FixedGrid([5, 6])
    with caplog.at_level(logging.WARNING):
        for server_round in (1, 2):
            strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({}), grid)
            assert len(list(strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord({}), grid))) == 2
    assert caplog.text.count("Waited 0 s for 3 nodes") == 2


def test_the_superlinks_answer_for_a_lost_node_is_that_nodes_failure(caplog):
    sent = [protocol_message(node) for node in (5, 6)]
    for i, msg in enumerate(sent):
        msg.metadata.__dict__["_message_id"] = f"m{i}"  # as the grid sets it when pushing
    unavailable = create_message_error_unavailable_res_message(sent[1].metadata, "node_unavail")
    assert unavailable.metadata.src_node_id == 1  # the SuperLink's own id
    replies = attribute_lost(sent, [reply(5, RecordDict({protocol.METRICS: client_metrics(0)})), unavailable])
    assert [r.metadata.src_node_id for r in replies] == [5, 6] and replies[1].has_error()
    screen = ReplyScreen(holders=lambda: {5: 0, 6: 1})
    screen.expect(TRAIN, [5, 6])
    with caplog.at_level(logging.WARNING):
        screened = screen.screen(3, TRAIN, replies, ReplySpec(train_metrics(1000)))
    assert screened.errors == [6] and not screened.rejected and screen.drain().rejected == 0
    assert "round 3: train failed on node 6 (partition 1): Error: Node Unavailable" in caplog.text


def protocol_message(node: int):
    from flwr.app import Message, MessageType  # pylint: disable=import-outside-toplevel
    return Message(RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)


def test_nodes_notes_reach_the_round_line_and_row(tmp_path, caplog):
    strategy = _strategy("local", tmp_path)
    strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), FixedGrid([5, 6]))
    notes = ConfigRecord({protocol.RESTORE_FILE: "local.prev.pt", protocol.RESTORE_REASON: "local.pt: bad"})
    replies = [reply(5, RecordDict({protocol.METRICS: client_metrics(0), protocol.NOTES: notes})),
               reply(6, RecordDict({protocol.METRICS: client_metrics(1)}))]
    strategy.aggregate_train(1, replies)
    recorder = RunRecorder(RunConfig(strategy="local"), ByteMeter(), run_dir=tmp_path)
    with caplog.at_level(logging.INFO):
        recorder.end_round(1, strategy.take_round_report())
    assert "node 5 (partition 0), train: restored local.prev.pt: local.pt: bad" in caplog.text
    assert re.search(r"round 1/10 .*restored node 5 from local.prev.pt", caplog.text)
    assert recorder.rows[-1]["restore_warnings"] == 1
    assert strategy.take_round_report().notes == []  # taken once


def test_train_metrics_are_means_over_the_replies_that_carry_them(tmp_path):
    """Two of three replies carry distill-loss 0.4: the aggregate is 0.4 (not diluted by
    the third), the weights are their num-examples, and partition ids are not averaged."""
    recorder = RunRecorder(RunConfig(), ByteMeter(), run_dir=tmp_path)
    records = [RecordDict({"metrics": MetricRecord(dict(client_metrics(p, 10 * (p + 1), **extra)))})
               for p, extra in ((0, {"distill-loss": 0.4}), (1, {"distill-loss": 0.4}), (2, {}))]
    records[2]["metrics"]["train-loss"] = 1.1
    out = recorder.aggregate_train(records, "num-examples")
    assert out["distill-loss"] == pytest.approx(0.4)
    assert out["train-loss"] == pytest.approx((10 * 0.5 + 20 * 0.5 + 30 * 1.1) / 60)
    assert "partition-id" not in out and "num-examples" not in out
    assert out["samples"] == 10 + 20 + 30  # summed, as the seconds are
