"""What training produces survives, and runs survive faults: with real Flower processes.

- every node's model is on disk after a run, loads, and scores what the run reported; a
  warm start continues from it (FedAvg's kept global model: test_flower_runs.py);
- a run whose SuperLink was killed mid-run is resumed to the same result as an
  uninterrupted run, once its orphaned ServerApp has let go of the run folder, and with
  one node's newest checkpoint damaged (it says which file it used instead);
- a SuperNode killed mid-run rejoins and continues its saved model; one that never comes
  back is counted once per instruction and waited for once per round;
- 30 % random client failures and a fleet short of 'min-nodes' never stop the run.
(Checkpoint refusals and the node-wait deadline are unit-tested in test_checkpoint.py.)
"""

import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import pytest

from kta_flwr.config import RunConfig
from kta_flwr.task.checkpoint import load_personalized, read_checkpoint
from kta_flwr.task.splits import load_client_data
from kta_flwr.task.training import evaluate
from kta_flwr.tools.faults import rounds_done, wait_for_rounds
from kta_flwr.tools.federation import LocalFederation, end_processes
from tests.conftest import read_results

pytestmark = pytest.mark.slow

CLIENTS = 3
BASE = {
    "reference-size": 100, "test-size": 200, "local-epochs": 1, "distill-epochs": 1,
    "min-nodes": CLIENTS, "tracking": "none",
}


def _config(tmp, name: str, **extra) -> dict:
    return {**BASE, "output-dir": str(tmp / name / "out"), "model-dir": str(tmp / name / "models"),
            **extra}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """One simulation SuperLink with 3 SuperNodes for the runs of this module."""
    work = tmp_path_factory.mktemp("faults-sim")
    with LocalFederation(work, CLIENTS, simulation=True) as fed:
        yield fed, work


def _submit(fed, app_dir, cfg: dict) -> dict:
    proc = fed.submit(app_dir, cfg)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (res,) = read_results(Path(cfg["output-dir"]))
    return res


def _check_persisted(work: Path, res: dict, rounds: int) -> None:
    """Every node's model is on disk, loads, and scores exactly what the run reported."""
    reported = {int(c["partition-id"]): c for c in res["clients_last_round"]}
    run_cfg = RunConfig(reference_size=100, test_size=200)
    for pid in range(CLIENTS):
        path = work / "models" / f"partition-{pid}" / "kta.pt"
        meta = read_checkpoint(path).meta
        assert (meta.round, meta.rounds_trained, meta.partition_id) == (rounds, rounds, pid)
        assert meta.run_id == meta.lineage == res["run_id"]
        assert (path.parent / "kta.prev.pt").is_file()  # the round before, kept
        model = load_personalized(path.parent, {"architecture": "mlp"})
        data = load_client_data(run_cfg, pid, CLIENTS)
        ours = evaluate(model, data.test.x, data.test.y, data.label_distribution, torch.device("cpu"))
        assert ours.personalized_accuracy == pytest.approx(reported[pid]["personalized-accuracy"], abs=1e-9)
        assert ours.accuracy == pytest.approx(reported[pid]["global-accuracy"], abs=1e-9)
        assert meta.accuracies["personalized-accuracy"] == pytest.approx(ours.personalized_accuracy)


def test_dropouts_and_a_short_fleet_never_stop_the_run(sim, app_dir):
    fed, work = sim
    rounds, rate = 4, 0.3
    cfg = _config(work, "dropout", **{
        "num-server-rounds": rounds, "fault-dropout": rate,
        # 4 nodes wanted, 3 connected: each round waits 1 s, then goes on with 3
        "min-nodes": 4, "node-wait-timeout": 1.0, "min-round-nodes": 2,
    })
    res = _submit(fed, app_dir, cfg)
    draws = [np.random.default_rng([0, pid, rnd, 7]).random(2)[0] < rate
             for rnd in range(1, rounds + 1) for pid in range(CLIENTS)]
    assert 0 < sum(draws) < len(draws)
    assert res["summary"]["failed"] == sum(draws)  # exactly the injected failures
    assert [r["round"] for r in res["rounds"]] == list(range(1, rounds + 1))
    assert not math.isnan(res["summary"]["final_personalized_accuracy"])


def test_killed_server_resumes_to_the_uninterrupted_result(sim, app_dir, tmp_path):
    fed, work = sim
    rounds = 5
    # the server distils a global model of its own (server-model): it resumes too
    server_model = {"server-model": "cnn", "server-model-epochs": 1}
    whole = _config(work, "whole", **{"num-server-rounds": rounds, **server_model})
    reference = _submit(fed, app_dir, whole)
    _check_persisted(work / "whole", reference, rounds)

    # a warm start continues every node's model (the round counters go on)
    _submit(fed, app_dir, {**whole, "num-server-rounds": 1, "warm-start": True,
                           "output-dir": str(work / "warm")})
    for pid in range(CLIENTS):
        meta = read_checkpoint(work / "whole" / "models" / f"partition-{pid}" / "kta.pt").meta
        assert (meta.rounds_trained, meta.round) == (rounds + 1, 1)

    # The SuperLink dies; its ServerApp lives on as an orphan (frozen here, so that it
    # cannot finish the run meanwhile) and still holds the run folder.
    cut = _config(tmp_path, "cut", **{"num-server-rounds": rounds, **server_model})
    with LocalFederation(tmp_path / "fed-a", CLIENTS, simulation=True) as first:
        first.launch(app_dir, cut)
        wait_for_rounds(tmp_path / "cut" / "out", 2, timeout=300)
        orphans = first.kill_superlink(freeze=True)
    try:
        (run_dir,) = [p.parent for p in (tmp_path / "cut" / "out").glob("*/server-state.json")]
        killed_at = rounds_done(run_dir.parent)
        assert 2 <= killed_at < rounds, "the run ended before it could be killed"
        refused = fed.submit(app_dir, {**cut, "resume-from": str(run_dir)})  # another SuperLink
        held = re.search(r"held by process (\d+)", refused.stdout + refused.stderr)
        assert held and int(held.group(1)) in orphans, refused.stdout[-3000:] + refused.stderr[-2000:]
    finally:
        end_processes(orphans)  # the orphan exits ...
    assert rounds_done(run_dir.parent) == killed_at  # ... having written nothing more

    # ... and partition 1's newest checkpoint is damaged: it falls back to the one before
    # (the round the resumed run continues from), says so, and the run is still exact
    models = tmp_path / "cut" / "models" / "partition-1"
    if read_checkpoint(models / "kta.pt").meta.round == killed_at:
        shutil.copyfile(models / "kta.pt", models / "kta.prev.pt")
    (models / "kta.pt").write_bytes(b"garbage")

    proc = fed.submit(app_dir, {**cut, "resume-from": str(run_dir)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "(partition 1), train: restored kta.prev.pt: checkpoint" in log and "kta.pt cannot be read" in log
    assert re.search(r"round %d/%d .*restored node \d+ from kta.prev.pt" % (killed_at + 1, rounds), log)
    (resumed,) = read_results(tmp_path / "cut" / "out")
    assert [r["restore_warnings"] for r in resumed["rounds"]][killed_at:] == [1] + [0] * (rounds - killed_at - 1)
    assert len(resumed["run_ids"]) == len(resumed["environments"]) == 2
    assert all(len(env["fab_hash"]) == 64 for env in resumed["environments"])  # the app that ran
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, rounds + 1))
    for key in ("bytes_up", "bytes_down", "bytes_total", "final_personalized_accuracy",
                "final_global_accuracy", "final_server_global_accuracy"):
        assert resumed["summary"][key] == reference["summary"][key], key
    assert ([r["server-global-accuracy"] for r in resumed["rounds"]]
            == [r["server-global-accuracy"] for r in reference["rounds"]])


def test_killed_supernodes_one_rejoins_and_one_never_returns(tmp_path, app_dir):
    """Three SuperNodes; after round 2, SuperNode 1 is SIGKILLed and restarted (a new node
    id: it rejoins and continues its saved model) and SuperNode 2 is SIGKILLed for good.
    The SuperLink answers each instruction a dead node id was sent with "node
    unavailable" (after two missed heartbeats, ~60 s): that answer is the lost node's
    failure, counted once (not also as a reply from an unasked node) and named. Every
    later round waits for the missing node once (``node-wait-timeout``), not once per
    phase, then goes on with the nodes present."""
    rounds, wait = 4, 4.0
    cfg = _config(tmp_path, "fleet", **{"num-server-rounds": rounds, "round-timeout": 120.0,
                                        "min-nodes": 3, "min-round-nodes": 2, "node-wait-timeout": wait})
    with LocalFederation(tmp_path / "fed", 3) as fed:
        run = fed.launch(app_dir, cfg)
        wait_for_rounds(tmp_path / "fleet" / "out", 2, timeout=300)
        fed.kill_supernode(fed.supernode(1))  # a crashed device: SIGKILL, no goodbye ...
        fed.kill_supernode(fed.supernode(2))
        fed.start_supernode(1)  # ... one back, with a new node id
        assert run.wait(timeout=900) == 0, (fed.logs / "run.log").read_text()[-4000:]
        log = (fed.logs / "run.log").read_text()
    (res,) = read_results(tmp_path / "fleet" / "out")
    assert [r["round"] for r in res["rounds"]] == list(range(1, rounds + 1))
    meta = read_checkpoint(tmp_path / "fleet" / "models" / "partition-1" / "kta.pt").meta
    assert meta.lineage == res["run_id"] and meta.round == rounds
    # at most rounds - 2 rounds after the restart: more means it continued its saved model
    assert meta.rounds_trained > rounds - 2
    lost = re.findall(r"round \d+: (?:train|evaluate) failed on node (\d+) \(partition (\d)\): "
                      r"Error: Node Unavailable", log)
    assert {partition for _, partition in lost} == {"1", "2"}, log[-4000:]
    assert len({node for node, partition in lost if partition == "2"}) == 1
    assert res["summary"]["failed"] == len(lost)  # once per instruction a dead id was sent
    assert "was not sent a" not in log  # the SuperLink's answer is not taken for a reply
    per_round = re.split(r"\[kta\] round \d+/\d+", log)
    waits = [chunk.count(f"Waited {wait:.0f} s for 3 nodes") for chunk in per_round]
    assert max(waits) == 1, waits
    assert res["rounds"][-1]["clients_evaluated"] == 2
