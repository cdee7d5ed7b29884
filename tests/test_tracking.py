"""Experiment tracking (kta_flwr/server/tracking.py) against a real MLflow store on disk,
read back through MLflow's client API; a real run's tracking is checked in
tests/test_flower_runs.py."""

import json

import numpy as np
import pytest

from kta_flwr.config import ConfigError, RunConfig
from kta_flwr.server import tracking
from kta_flwr.flower.results import round_metrics
from kta_flwr.server.tracking import TRACKING_FILE, MlflowTracker, NoTracking, local_store_uri, tracker_for

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed (pip install 'kta-flwr[tracking]')")


def _row(server_round: int) -> dict:
    return {"strategy": "kta", "round": server_round, "personalized-accuracy": 0.5 + server_round / 10,
            "global-accuracy": 0.25, "cum_bytes_up": 2**20 * server_round, "cum_bytes_down": 2**19,
            "failed": 0, "stale": 1}


DECISIONS = {"distill": np.array([True, False, True]), "tau": np.array([0.5, 1.0, 1.5]),
             "partition": np.array([0, 1, 2]), "weight": np.ones((3, 3), np.float32)}


def test_round_metrics_take_the_numbers_and_summarise_the_decisions():
    assert round_metrics(_row(3), DECISIONS) == pytest.approx({
        "personalized-accuracy": 0.8, "global-accuracy": 0.25, "cum_bytes_up": 3 * 2**20,
        "cum_bytes_down": 2**19, "failed": 0.0, "stale": 1.0, "cum_mib_total": 3.5,
        "decisions/distill_count": 2.0, "decisions/tau_mean": 1.0})


def test_mlflow_tracker_logs_config_rounds_decisions_and_files(tmp_path):
    run_dir = tmp_path / "out" / "20261206-000000-kta"
    run_dir.mkdir(parents=True)
    cfg = RunConfig(output_dir=str(tmp_path / "out"), num_server_rounds=2)
    tracker = tracker_for(cfg)
    assert isinstance(tracker, MlflowTracker)
    assert tracker.tracking_uri == local_store_uri(tmp_path / "out")
    tracker.start(run_dir, cfg, {"strategy": "kta"})
    for server_round in (1, 2):
        tracker.log_round(server_round, _row(server_round), DECISIONS)
    (run_dir / "results.json").write_text("{}")
    (run_dir / "rounds").mkdir()
    (run_dir / "rounds" / "round-0001.npz").write_bytes(b"x")
    tracker.finish(run_dir)

    saved = json.loads((run_dir / TRACKING_FILE).read_text())
    client = mlflow.tracking.MlflowClient(tracking_uri=saved["tracking_uri"])
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["strategy"] == "kta" and run.data.params["num-server-rounds"] == "2"
    assert len(run.data.params) == len(cfg.to_flwr())  # the whole config, in batches of 100
    assert run.data.tags["strategy"] == "kta" and run.data.tags["kta.run_dir"] == str(run_dir)
    history = client.get_metric_history(run.info.run_id, "personalized-accuracy")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([0.6, 0.7])
    assert client.get_metric_history(run.info.run_id, "decisions/distill_count")[0].value == 2.0
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"results.json", "rounds"}
    assert [f.path for f in client.list_artifacts(run.info.run_id, "rounds")] == ["rounds/round-0001.npz"]
    assert (tmp_path / "out" / "mlartifacts").is_dir()  # beside the database, not in the cwd

    # A resumed run continues the same MLflow run.
    again = tracker_for(cfg)
    again.start(run_dir, cfg, {"strategy": "kta"})
    again.log_round(3, _row(3), {})
    again.finish(run_dir)
    history = client.get_metric_history(run.info.run_id, "personalized-accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    assert client.get_run(run.info.run_id).data.tags["kta.resumed"] == "true"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_broken_store_never_stops_the_run(tmp_path, caplog):
    """An unusable tracking URI: the run's calls return, one warning names the failure."""
    (tmp_path / "a-file").write_text("not a folder")
    cfg = RunConfig(output_dir=str(tmp_path), tracking_uri=f"sqlite:///{tmp_path}/a-file/mlflow.db")
    tracker = tracker_for(cfg)
    tracker.start(tmp_path, cfg, {})
    tracker.log_round(1, _row(1), DECISIONS)
    tracker.finish(tmp_path)
    assert not (tmp_path / TRACKING_FILE).exists()
    assert "could not open the run" in caplog.text and "a-file" in caplog.text


def test_tracking_choices(monkeypatch):
    assert isinstance(tracker_for(RunConfig(tracking="none")), NoTracking)
    with pytest.raises(ConfigError, match="'tracking'"):
        RunConfig(tracking="tensorboard").replace()
    with pytest.raises(ConfigError, match="'tracking-experiment'"):
        RunConfig().replace(tracking_experiment=" ")
    monkeypatch.setattr(tracking, "mlflow_installed", lambda: False)  # a ServerApp without it
    assert isinstance(tracker_for(RunConfig()), NoTracking)  # auto: off, said once in the log
    with pytest.raises(ConfigError, match="'tracking' = 'mlflow' needs MLflow"):
        tracker_for(RunConfig(tracking="mlflow"))
