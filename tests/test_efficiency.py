"""The efficiency benchmark: the plain-loop baseline's sample count, the recorder's time
sums, and the benchmark end to end through a real Flower simulation."""

import json
import math

import pytest
from flwr.app import MetricRecord, RecordDict

from kta_flwr.config import RunConfig
from kta_flwr.task.splits import load_client_data
from kta_flwr.tools.efficiency import plain_loop, run_efficiency
from kta_flwr.flower.metering import ByteMeter
from kta_flwr.flower.results import RunRecorder
from kta_flwr.task.training import training_samples

TINY = {"reference-size": 100, "test-size": 100, "local-epochs": 1, "distill-epochs": 2,
        "batch-size": 16, "tracking": "none"}


def test_plain_loop_trains_as_many_samples_as_the_clients_count():
    cfg = RunConfig(num_server_rounds=3, reference_size=100, test_size=100, local_epochs=1,
                    distill_epochs=2, batch_size=16)
    expected = 0
    for pid in range(2):
        data = load_client_data(cfg, pid, 2)
        for rnd in range(1, 4):
            expected += training_samples(
                len(data.train.y), len(data.reference.y), local_epochs=1, distill_epochs=2,
                batch_size=16, private_weight=1.0, distilled=rnd > 1,
            )
    assert plain_loop(cfg, 2)["samples"] == expected


def test_recorder_sums_samples_and_seconds_over_clients():
    recorder = RunRecorder(RunConfig(), ByteMeter())
    replies = [RecordDict({"metrics": MetricRecord(
        {"num-examples": n, "train-loss": loss, "samples": 10 * n, "t-stage1": sec})})
        for n, loss, sec in ((1, 1.0, 0.5), (3, 2.0, 1.5))]
    out = recorder.aggregate_train(replies, "num-examples")
    assert out["samples"] == 40 and out["t-stage1"] == pytest.approx(2.0)
    assert out["train-loss"] == pytest.approx(1.75)  # Flower's weighted mean
    row = recorder.end_round(1, None)
    assert row is not None and recorder.rows[0]["samples"] == 40
    assert recorder.rows[0]["train_s_stage1"] == pytest.approx(2.0)
    assert recorder.rows[0]["train_s_stage2"] == 0.0


@pytest.mark.slow
def test_efficiency_benchmark_end_to_end(tmp_path):
    report = run_efficiency(
        "digits", 2, tmp_path, {**TINY, "num-server-rounds": 3, "evaluate-every": 2},
        scaling=[3], scaling_overrides={"num-server-rounds": 2},
    )
    out = tmp_path / "efficiency" / "digits"
    assert json.loads((out / "efficiency.json").read_text())["ratio"] == report["ratio"]
    ratio = report["ratio"]
    assert ratio["flower_samples"] == ratio["plain_samples"] > 0
    assert 0 < ratio["end_to_end"] < 10 and 0 < ratio["rounds_only"]
    # Every second of the Flower run is accounted for, once.
    assert sum(report["breakdown"].values()) == pytest.approx(ratio["flower_wall"], abs=0.5)
    assert report["breakdown"]["client training (stage 2, distillation)"] > 0
    res = json.loads(open(ratio["flower_results_json"]).read())
    rows = res["rounds"]
    # evaluate-every = 2 over 3 rounds: rounds 2 and 3 evaluate, round 1 does not.
    assert math.isnan(rows[0]["personalized-accuracy"]) and rows[0]["eval_s_evaluate"] == 0
    assert not math.isnan(rows[1]["personalized-accuracy"]) and rows[2]["eval_s_evaluate"] > 0
    assert [row["samples"] for row in rows][1] > rows[0]["samples"]  # stage 2 from round 2
    assert [p["clients"] for p in report["scaling"]] == [3]
    assert (out / "round_time_vs_clients.png").stat().st_size > 10_000
    table = (out / "efficiency.md").read_text()
    assert "ratio, end to end" in table and "| 3 |" in table
