"""Saved state that is safe to open: the server's checkpoint (JSON + .npz, never a pickle),
the run folder's one-writer lock, model checkpoints checked against their architecture,
and a node that says which checkpoint it restored when the newest one is damaged."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from client_app.app import evaluate, train
from kta_flwr.config import ConfigError, RunConfig
from kta_flwr.flower import protocol
from kta_flwr.flower.run_state import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    RunState,
    load_run_state,
    save_run_state,
)
from kta_flwr.storage import FolderBusy, FolderLock, StateFileError, read_state, write_state
from kta_flwr.task.checkpoint import (
    CheckpointError,
    checkpoint_file,
    load_personalized,
    read_checkpoint,
    save_checkpoint,
)
from kta_flwr.task.models import ModelSpec, build_model
from tests.conftest import FakeNode, model_meta

SPEC = ModelSpec((1, 8, 8), 10)
FORMAT = "test-state/1"


def _tree() -> dict:
    return {"round": 3, "nan": float("nan"), "inf": -float("inf"), "tuple": (1, "a", (2.5,)),
            "set": {3, 1}, "by_node": {17: np.arange(4, dtype=np.float32), 2: {"x": np.int64(5)}},
            "pairs": {("train", "up"): 12}, "__dunder": [None, True], "empty": np.zeros((0, 3)),
            "rng": np.random.get_state()}


def test_state_files_round_trip_what_json_lacks(tmp_path):
    tree = _tree()
    write_state(tmp_path / "s.json", tree, format_name=FORMAT)
    back = read_state(tmp_path / "s.json", format_name=FORMAT)
    assert back["round"] == 3 and np.isnan(back["nan"]) and back["inf"] == -float("inf")
    assert back["tuple"] == (1, "a", (2.5,)) and back["set"] == {1, 3}
    np.testing.assert_array_equal(back["by_node"][17], np.arange(4, dtype=np.float32))
    assert back["by_node"][2] == {"x": 5} and back["pairs"] == {("train", "up"): 12}
    assert back["__dunder"] == [None, True] and back["empty"].shape == (0, 3)
    np.random.set_state(back["rng"])  # a numpy RNG state comes back usable
    document = json.loads((tmp_path / "s.json").read_text())
    assert document["format"] == FORMAT and "NaN" not in (tmp_path / "s.json").read_text()
    # a second write replaces the arrays file; the old one is removed
    write_state(tmp_path / "s.json", {"a": np.ones(2)}, format_name=FORMAT)
    assert len(list(tmp_path.glob("s.*.npz"))) == 1
    with pytest.raises(TypeError, match="object arrays"):
        write_state(tmp_path / "t.json", {"a": np.array([object()])}, format_name=FORMAT)


@pytest.mark.parametrize("damage, reason", [
    ("truncated json", "is not JSON"),
    ("garbage json", "is not JSON"),
    ("foreign json", "is not a test-state/1 file"),
    ("truncated npz", "SHA-256 differs"),
    ("swapped npz", "SHA-256 differs"),
    ("missing npz", "cannot be read"),
    ("escaping name", "not an .npz beside it"),
    ("unknown tag", "unknown tag"),
])
def test_damaged_state_files_are_refused_naming_file_and_reason(tmp_path, damage, reason):
    path = tmp_path / "s.json"
    write_state(path, {"a": np.arange(100.0), "b": [1, 2]}, format_name=FORMAT)
    (npz,) = tmp_path.glob("s.*.npz")
    document = json.loads(path.read_text())
    if damage == "truncated json":
        path.write_text(path.read_text()[:40])
    elif damage == "garbage json":
        path.write_bytes(os.urandom(200))
    elif damage == "foreign json":
        path.write_text(json.dumps({"format": "someone-else/3", "state": {}}))
    elif damage == "truncated npz":
        npz.write_bytes(npz.read_bytes()[:50])
    elif damage == "swapped npz":
        write_state(tmp_path / "other.json", {"a": np.ones(3)}, format_name=FORMAT)
        (other,) = tmp_path.glob("other.*.npz")
        npz.write_bytes(other.read_bytes())
    elif damage == "missing npz":
        npz.unlink()
    elif damage == "escaping name":
        path.write_text(json.dumps({**document, "arrays": {"file": "../x.npz", "sha256": "0"}}))
    else:
        path.write_text(json.dumps({**document, "state": {"__pickle__": "x"}}))
    with pytest.raises(StateFileError, match=reason) as err:
        read_state(path, format_name=FORMAT)
    assert str(tmp_path) in str(err.value)


class _Planted:  # unpickling this runs code: it writes the marker file
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / LEGACY_STATE_FILE).write_bytes(pickle.dumps(_Planted(str(marker))))
    with pytest.raises(ConfigError, match="is a pickle .* not opened"):
        load_run_state(tmp_path)
    # nor under the new name: it is not JSON
    (tmp_path / STATE_FILE).write_bytes(pickle.dumps(_Planted(str(marker))))
    with pytest.raises(ConfigError, match=f"{STATE_FILE} is not JSON"):
        load_run_state(tmp_path)
    assert not marker.exists()


def test_a_run_state_with_a_wrong_field_is_refused_naming_it(tmp_path):
    state = RunState.capture(round=2, lineage=5, config=RunConfig().to_flwr(), strategy={},
                             recorder={})
    save_run_state(tmp_path, state)
    assert load_run_state(tmp_path).lineage == 5
    document = json.loads((tmp_path / STATE_FILE).read_text())
    document["state"]["round"] = "two"
    (tmp_path / STATE_FILE).write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="field 'round'"):
        load_run_state(tmp_path)


HOLDER = textwrap.dedent("""
    import sys, time
    from kta_flwr.storage import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_run_folder_has_one_writer_and_a_dead_one_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=f"held by process {holder.pid} on host"):
            FolderLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing anything
        holder.wait()
    with FolderLock(tmp_path) as lock:  # the kernel released it
        assert lock.holder()["pid"] == os.getpid()
    assert FolderLock(tmp_path).acquire()  # and again after a release


@pytest.mark.parametrize("change, field", [
    ("shape", "tensor '6.weight' is torch.float32[5, 16], the model's is torch.float32[10, 512]"),
    ("missing", "tensor '6.bias' is missing"),
    ("extra", "tensor 'extra' is not a tensor of the model"),
    ("nan", "tensor '6.weight' holds 1 NaN/inf values"),
    ("dtype", "tensor '6.bias' is torch.float64"),
])
def test_a_checkpoint_that_does_not_fit_its_architecture_is_refused(tmp_path, change, field):
    state = build_model("cnn", SPEC, 0).state_dict()
    if change == "shape":
        state["6.weight"] = torch.zeros(5, 16)
    elif change == "missing":
        del state["6.bias"]
    elif change == "extra":
        state["extra"] = torch.zeros(1)
    elif change == "nan":
        state["6.weight"] = state["6.weight"].clone()
        state["6.weight"][0, 0] = float("nan")
    else:
        state["6.bias"] = state["6.bias"].double()
    path = checkpoint_file(tmp_path, "kta")
    save_checkpoint(path, model_meta(), state)
    with pytest.raises(CheckpointError, match=field.replace("[", r"\[").replace("]", r"\]")) as err:
        load_personalized(tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    cli = subprocess.run([sys.executable, "-m", "kta_flwr.tools.predict", "--model", str(path),
                          "--input", str(tmp_path / "x.npy")], capture_output=True, text=True, check=False)
    assert cli.returncode == 2 and cli.stderr.startswith("error: checkpoint") and "Traceback" not in cli.stderr


def _instruction(kind: str, server_round: int, lineage: int) -> Message:
    config = ConfigRecord({"server-round": server_round, protocol.LINEAGE: lineage})
    return Message(RecordDict({protocol.CONFIG: config}), dst_node_id=11,
                   message_type=MessageType.TRAIN if kind == "train" else MessageType.EVALUATE)


def _restart(node: FakeNode, run_id: int) -> None:
    """The node comes back under a new run (a resumed run): empty state."""
    context = node.context
    node.context = type(context)(run_id=run_id, node_id=11, state=RecordDict(),
                                 run_config=context.run_config, node_config=context.node_config)


def _trained_kta_node(tmp_path, **config) -> tuple[FakeNode, object]:
    """A kta node (partition 1) after rounds 1 and 2 of run 7, and its model folder."""
    node = FakeNode(tmp_path, "kta", **config)
    for server_round in (1, 2):
        node.call("train", server_round)
    return node, tmp_path / "kta" / "1"


@pytest.mark.usefixtures("server_identity")
def test_a_resumed_node_passes_over_a_damaged_checkpoint_and_says_so(tmp_path):
    node, folder = _trained_kta_node(tmp_path, num_server_rounds=4)
    # the resumed run continues after round 2: round 2's file is the previous one (round 3
    # was saved), and round 3's is damaged
    saved = read_checkpoint(folder / "kta.pt")
    save_checkpoint(folder / "kta.pt", dataclasses.replace(saved.meta, round=3), saved.state)
    (folder / "kta.pt").write_bytes(b"\x80garbage")
    _restart(node, run_id=8)
    out = train(_instruction("train", 3, lineage=7), node.context)
    notes = out.content.config_records[protocol.NOTES]
    assert notes[protocol.RESTORE_FILE] == "kta.prev.pt"
    assert "kta.pt cannot be read" in notes[protocol.RESTORE_REASON]
    # nothing usable at all in a resumed run: a fresh start, and it says so
    for name in ("kta.pt", "kta.prev.pt"):
        (folder / name).write_bytes(b"")
    _restart(node, run_id=9)
    notes = evaluate(_instruction("evaluate", 3, lineage=7), node.context).content.config_records[protocol.NOTES]
    assert notes[protocol.RESTORE_FILE] == "none" and notes[protocol.RESTORE_REASON].endswith("starting fresh")


@pytest.mark.usefixtures("server_identity")
def test_a_warm_start_falls_back_to_an_intact_previous_checkpoint(tmp_path):
    _, folder = _trained_kta_node(tmp_path, num_server_rounds=2)
    state = read_checkpoint(folder / "kta.pt").state
    next(iter(state.values())).fill_(float("nan"))
    save_checkpoint(folder / "kta.pt", read_checkpoint(folder / "kta.pt").meta, state, keep_previous=False)
    warm = FakeNode(tmp_path, "kta", num_server_rounds=2, warm_start=True)
    _restart(warm, run_id=20)
    out = train(warm.message("train", 1), warm.context)
    assert out.content.config_records[protocol.NOTES][protocol.RESTORE_FILE] == "kta.prev.pt"
    assert "NaN/inf" in out.content.config_records[protocol.NOTES][protocol.RESTORE_REASON]
    assert read_checkpoint(folder / "kta.pt").meta.rounds_trained == 2  # round 1's model, + 1
    # both damaged: the warm start is refused, naming both files
    (folder / "kta.pt").write_bytes(b"x")
    (folder / "kta.prev.pt").write_bytes(b"y")
    _restart(warm, run_id=21)
    with pytest.raises(CheckpointError, match="warm-start': no usable checkpoint .*kta.pt.*kta.prev.pt"):
        train(warm.message("train", 1), warm.context)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("strategy", ["kta", "fedavg", "sapef", "ditto"])  # one per family
def test_a_node_draws_its_partition_once_a_run_and_reads_it_from_its_context_after(tmp_path, strategy):
    """A SuperNode starts a process for every message: the run's first message draws the
    node's partition and keeps its rows in the run's Context, the next ones read them
    from there (shown by planting another partition's rows), and rows that do not fit
    the training pool are drawn again and kept anew."""
    from flwr.app import Array, ArrayRecord  # pylint: disable=import-outside-toplevel

    from kta_flwr.client.node import PARTITION_STATE, Node  # pylint: disable=import-outside-toplevel
    from kta_flwr.task.splits import load_client_data  # pylint: disable=import-outside-toplevel

    fake = FakeNode(tmp_path, strategy, partition=1)
    drawn = load_client_data(fake.cfg, 1, 4)
    pool = drawn.splits.train
    first = Node(fake.message("train", 1), fake.context)
    np.testing.assert_array_equal(first.data.rows, drawn.rows)
    np.testing.assert_array_equal(first.data.train.y, pool.y[drawn.rows])
    kept = fake.context.state.array_records[PARTITION_STATE]["rows"].numpy()
    np.testing.assert_array_equal(kept, drawn.rows)

    other = load_client_data(fake.cfg, 2, 4).rows
    assert not np.array_equal(other, drawn.rows)
    fake.context.state[PARTITION_STATE] = ArrayRecord({"rows": Array(other)})
    second = Node(fake.message("evaluate", 1), fake.context)
    np.testing.assert_array_equal(second.data.train.x, pool.x[other])

    fake.context.state[PARTITION_STATE] = ArrayRecord({"rows": Array(np.array([len(pool.y)], np.int64))})
    third = Node(fake.message("train", 2), fake.context)
    np.testing.assert_array_equal(third.data.rows, drawn.rows)
    np.testing.assert_array_equal(
        fake.context.state.array_records[PARTITION_STATE]["rows"].numpy(), drawn.rows)
