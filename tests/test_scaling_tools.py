"""The scaling benchmarks (issue 19): the process-tree memory sampler, the market scaling
benchmark, and the cross-device benchmark end to end through real Flower simulations."""

import json
import subprocess
import sys

import pytest

from kta_flwr.tools.cross_device import run_cross_device
from kta_flwr.tools.market_scaling import market_round, run_market_scaling
from kta_flwr.tools.memory import PeakRss, tree_rss_bytes


def test_peak_rss_counts_the_children_of_the_process_tree():
    child = subprocess.Popen(  # holds 300 MiB for 2 s
        [sys.executable, "-c", "import time; b = bytearray(300 * 2**20); time.sleep(2)"])
    try:
        with PeakRss(lambda: [child.pid], interval=0.1) as rss:
            child.wait(timeout=30)
        assert rss.peak_mib >= 300
    finally:
        child.kill()
    assert tree_rss_bytes([child.pid]) == 0  # gone: nothing counted, no error


def test_market_round_reports_time_and_memory():
    exact = market_round(12, 50, 5, "exact", {}, repeats=3)
    assert exact["seconds"] > 0 and exact["peak_rss_mib"] >= exact["rss_before_mib"] > 0
    assert exact["rounds"] == 3 and exact["first_seconds"] > 0
    assert exact["input_mib"] == pytest.approx(12 * 50 * 5 * 4 / 2**20)
    with pytest.raises(TypeError):  # a bad option fails loudly, not silently ignored
        market_round(12, 50, 5, "fast", {"no-such-key": 1})


@pytest.mark.slow
def test_market_scaling_benchmark_skips_the_reference_past_its_budget(tmp_path):
    report = run_market_scaling([4, 8], 40, 5, tmp_path, {"divergence-rows": 8, "neighbours": 1},
                                reference_budget=0.0)
    done = {(p["clients"], p["variant"]) for p in report["points"]}
    assert done == {(4, "reference"), (4, "exact"), (4, "fast"), (8, "exact"), (8, "fast")}
    out = tmp_path / "market_scaling"
    assert "| 8 | not run |" in (out / "market_scaling.md").read_text()
    assert (out / "market_seconds_vs_clients.png").stat().st_size > 10_000
    assert len((out / "market_scaling.csv").read_text().splitlines()) == 6


@pytest.mark.slow
def test_cross_device_benchmark_end_to_end(tmp_path):
    report = run_cross_device(  # 8 clients above full participation at 3: a 10 % sample
        "digits", [8], ["kta"], tmp_path,
        {"num-server-rounds": 2, "reference-size": 100, "test-size": 100, "local-epochs": 1,
         "distill-epochs": 1, "tracking": "none"}, full_participation=3,
    )
    (p,) = report["points"]
    assert p["fraction"] == 0.1 and p["clients_evaluated"] == 1
    assert p["messages_per_round"] == 2  # round 2: one train and one evaluate message
    assert p["market_seconds_per_round"] > 0 and p["client_seconds_per_round"] > 0
    assert p["simulation_peak_rss_mib"] > p["server_peak_rss_mib"] > 0
    assert 0 <= p["personalized_accuracy"] <= 1
    rows = json.loads(open(p["results_json"]).read())["rounds"]
    assert "market_seconds" in rows[-1] and rows[-1]["clients_evaluated"] == 1
    out = tmp_path / "cross_device" / "digits"
    assert json.loads((out / "cross_device.json").read_text())["points"] == report["points"]
    assert (out / "cost_vs_clients.png").stat().st_size > 10_000
