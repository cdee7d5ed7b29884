"""Real Flower runs: the simulation engine and a SuperLink with SuperNodes, on loopback.

Each test owns its processes (kta_flwr.tools.federation.LocalFederation) and stops them even when an
assertion fails. Checked through the results files the ServerApp writes.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kta_flwr.flower import protocol
from kta_flwr.config import RunConfig
from kta_flwr.task.checkpoint import load_personalized
from kta_flwr.task.splits import load_client_data, load_splits
from kta_flwr.task.training import evaluate
from kta_flwr.flower.round_log import dense_weights, read_rounds
from kta_flwr.server.tracking import TRACKING_FILE, local_store_uri
from kta_flwr.tools.federation import LocalFederation
from kta_flwr.tools.inspect import inspect_run
from kta_flwr.task.models import build_model
from kta_flwr.tools.presets import load_preset
from tests.conftest import read_results
from tests.wire import check_compressed, check_shared_model

pytestmark = pytest.mark.slow

ROUNDS, CLIENTS, N_REF, C = 2, 3, 100, 10
HOLDOUT = RunConfig().holdout_fraction  # kta's adaptive market scores on these rows
SMALL = {
    "num-server-rounds": ROUNDS, "reference-size": N_REF, "test-size": 200,
    "local-epochs": 1, "distill-epochs": 1, "tracking": "none",
}
#: The runs whose MLflow tracking is checked (the default store under their output-dir).
TRACKED = {"tracking": "mlflow"}
#: An unlabeled transfer set carved out of the pool, 25 of its 60 rows exchanged a round.
TRANSFER = {"transfer-source": "pool", "transfer-size": 60, "transfer-rows": 25}
#: The server's own global model under the market (a CNN; the clients train MLPs).
SERVER_MODEL = {"server-model": "cnn", "server-model-epochs": 2}


def _check_common(res: dict, strategy: str) -> None:
    assert res["config"]["strategy"] == strategy
    assert [row["round"] for row in res["rounds"]] == list(range(1, ROUNDS + 1))
    for row in res["rounds"]:
        assert row["clients_evaluated"] == CLIENTS and row["failed"] == 0
        assert 0.0 <= row["personalized-accuracy"] <= 1.0 and 0.0 <= row["global-accuracy"] <= 1.0
    assert not math.isnan(res["summary"]["final_personalized_accuracy"])


def _target_rows(run_dir: Path, server_round: int, fraction: float = 1.0) -> int:
    """Rows the targets priced in ``server_round`` cover: the rows of that round's
    reference subset (the next round's) but those the market scored on (held out), as
    the run folder records them."""
    rows = protocol.reference_subset(N_REF, fraction, 0, server_round + 1)
    scored = read_rounds(run_dir)[server_round]["scored_rows"]
    assert np.isin(scored, rows).all() and len(scored) > 0
    return len(rows) - len(scored)


def _targets_sent(res: dict) -> list[int]:
    """Per round r < R, how many clients the market (gate) gave targets for round r + 1."""
    return [int(res["train_metrics"][str(r)]["distilling-clients"]) for r in range(1, ROUNDS)]


#: kta with DP-SGD and noisy logits (a loose clip so that the noise is small here).
PRIVATE_KTA = {"dp-epsilon": 3.0, "logit-noise": 0.05, "logit-clip": 5.0}


def _check_private(res: dict, log: str, keys: tuple[str, ...]) -> None:
    """A DP run: every client's ε in every round's line and row, within the target at
    the last round (DP-SGD), each client's latest in the summary."""
    _check_common(res, res["config"]["strategy"])
    for key in keys:
        assert f"{key.replace('_', '-')} max " in log
        per_client = res["summary"][key]
        assert sorted(per_client) == [str(p) for p in range(CLIENTS)]
        maxima = [row[f"{key}_max"] for row in res["rounds"]]
        assert 0 < maxima[0] < maxima[-1]  # it grows round by round
        assert max(per_client.values()) == pytest.approx(maxima[-1], abs=1e-4)
    assert max(res["summary"]["dp_epsilon"].values()) <= res["config"]["dp-epsilon"]


def _check_tiers(res: dict) -> None:
    """A ``tiers3`` fleet of three clients: one partition per tier, each with its tier's
    model; the tiers' bytes add up to the run's, their accuracies to its mean."""
    _check_common(res, "kta")
    cfg, summary = RunConfig(fleet="tiers3"), res["summary"]
    tiers = summary["tiers"]
    assert [(tier, t["model"]) for tier, t in tiers.items()] == [
        ("small", "cnn"), ("medium", "mlp"), ("large", "resnet8")]
    for index, t in enumerate(tiers.values()):
        assert [cfg.tier_of_partition(p) for p in t["partitions"]] == [index]
        assert t["train_seconds_per_reply"] > 0
    assert sorted(p for t in tiers.values() for p in t["partitions"]) == list(range(CLIENTS))
    for way in ("up", "down"):
        assert sum(t[f"bytes_{way}"] for t in tiers.values()) == (
            summary[f"bytes_{way}"] + summary[f"eval_bytes_{way}"])
    assert np.mean([t["personalized-accuracy"] for t in tiers.values()]) == pytest.approx(
        summary["final_personalized_accuracy"])


def test_simulation_kta_and_fedavg_bytes(tmp_path, app_dir):
    out = tmp_path / "out"
    # Five runs, each checking what its options change (a run costs ~25 s of CPU, nearly
    # all process start-ups): DP rides on the fedavg and the top-k runs, the tiers3
    # fleet on the half-reference run with transfer rows (no byte count depends on it).
    runs = [("kta", TRACKED), ("fedavg", {**TRACKED, "dp-epsilon": 3.0}),
            ("kta", {"codec": "topk", "codec-topk": 2, **PRIVATE_KTA}),
            ("kta", {"reference-fraction": 0.5, **TRANSFER, "fleet": "tiers3"}),
            ("kta", {"node-state": "disk", **SERVER_MODEL})]
    logs = []
    with LocalFederation(tmp_path, CLIENTS, simulation=True) as fed:
        for i, (strategy, extra) in enumerate(runs):
            cfg = {**SMALL, **extra, "strategy": strategy, "output-dir": str(out / str(i))}
            proc = fed.submit(app_dir, cfg)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            assert f"[{strategy}] round {ROUNDS}/{ROUNDS}" in proc.stdout
            logs.append(proc.stdout)
    kta, fedavg, topk, half, on_disk = (read_results(out / str(i))[0] for i in range(len(runs)))
    _check_tiers(half)
    _check_private(topk, logs[2], ("dp_epsilon", "logit_epsilon"))  # noisy logits, same bytes
    _check_private(fedavg, logs[1], ("dp_epsilon",))

    # Each round's decisions are kept in the run folder, and the inspect tool draws them.
    (kta_dir,) = [p.parent for p in (out / "0").glob("*/results.json")]
    rounds = read_rounds(kta_dir)
    assert list(rounds) == list(range(1, ROUNDS + 1))
    for server_round, arrays in rounds.items():
        assert sorted(arrays["partition"]) == list(range(CLIENTS))
        assert sorted(arrays["eval_partition"]) == list(range(CLIENTS))
        np.testing.assert_allclose(dense_weights(arrays).sum(axis=1), 1.0, rtol=1e-6)
        assert arrays["prior"].shape == (CLIENTS, C)
        assert arrays["bytes_up"].sum() == kta["rounds"][server_round - 1]["bytes_up"]
        if server_round < ROUNDS:  # the targets priced in round r are sent in round r + 1
            assert arrays["bytes_down"].sum() == kta["rounds"][server_round]["bytes_down"]
        assert arrays["distill"].sum() == kta["train_metrics"][str(server_round)]["distilling-clients"]
    scored = [arrays["scored_rows"] for arrays in rounds.values()]  # drawn anew each round
    assert all(not np.array_equal(a, b) for a, b in zip(scored, scored[1:]))
    drawn = inspect_run(kta_dir)["drawn"]
    assert all((kta_dir / name).stat().st_size > 5_000 for name in drawn) and len(drawn) == 4
    (fedavg_dir,) = [p.parent for p in (out / "1").glob("*/results.json")]
    assert inspect_run(fedavg_dir)["drawn"] == ["client_accuracy.png"]  # no market: accuracy only

    # Models kept on disk only (node-state = disk), and the server distilling a global
    # model of its own (server-model): the same run, round for round (the means over
    # clients may add them in another order: equal to the last bits), the same bytes.
    for key in ("personalized-accuracy", "global-accuracy", "bytes_up", "bytes_down", "messages"):
        assert [row[key] for row in on_disk["rounds"]] == pytest.approx(
            [row[key] for row in kta["rounds"]], rel=1e-12, abs=0)
    assert on_disk["summary"]["wire_manifest"] == kta["summary"]["wire_manifest"]
    _check_server_model(out / "4", on_disk, logs[4])

    # kta on a rotating half of the reference set and 25 transfer rows a round: half the
    # reference rows and the transfer rows up; down, the half's rows that are not held
    # out and the transfer rows, to the clients the gate let through.
    _check_common(half, "kta")
    transfer = TRANSFER["transfer-rows"]
    assert half["summary"]["bytes_up"] == ROUNDS * CLIENTS * (N_REF // 2 + transfer) * C * 4
    (half_dir,) = [p.parent for p in (out / "3").glob("*/results.json")]
    assert half["summary"]["bytes_down"] == sum(
        n * (_target_rows(half_dir, r, 0.5) + transfer) * C * 4
        for r, n in enumerate(_targets_sent(half), start=1)
    )
    assert f"train/up logits.values float32[{N_REF // 2 + transfer}, {C}]" in half["summary"]["wire_manifest"]

    # kta with the topk codec (k = 2): per row 2 uint8 class indices + 2 uint8 probabilities.
    _check_common(topk, "kta")
    held_in = N_REF - protocol.held_out_count(N_REF, HOLDOUT)
    assert all(_target_rows(kta_dir, r) == held_in for r in range(1, ROUNDS))
    assert topk["summary"]["bytes_up"] == ROUNDS * CLIENTS * N_REF * 4
    assert topk["summary"]["bytes_down"] == sum(_targets_sent(topk)) * held_in * 4
    assert set(topk["summary"]["wire_manifest"]) <= {
        f"train/{d} {k}.{a} uint8[{rows}, 2]"
        for d, k, rows in (("up", "logits", N_REF), ("down", "targets", held_in))
        for a in ("index", "prob")
    }
    _check_common(kta, "kta")
    _check_common(fedavg, "fedavg")

    # kta: R uploads of [N_ref, C] float32 logits per client; in rounds 2..R, targets on
    # the rows not held out, to each client the market's gate let through.
    per_transfer = N_REF * C * 4
    sent = sum(_targets_sent(kta))
    assert kta["summary"]["bytes_up"] == ROUNDS * CLIENTS * per_transfer
    assert kta["summary"]["bytes_down"] == sent * held_in * C * 4
    assert kta["summary"]["eval_bytes_down"] == 0
    # No model weight ever crossed the wire: every array was logits/targets.
    manifest = {f"train/up logits.values float32[{N_REF}, {C}]": ROUNDS * CLIENTS}
    if sent:
        manifest[f"train/down targets.values float32[{held_in}, {C}]"] = sent
    assert kta["summary"]["wire_manifest"] == manifest
    assert sent + sum(_targets_sent(topk)) + sum(_targets_sent(half)) > 0  # targets did flow

    # FedAvg: the full model each way, every round, per client (+ evaluation broadcast).
    cfg = RunConfig()
    splits = load_splits(cfg.replace(reference_size=N_REF, test_size=200))
    model = build_model("mlp", splits.spec, 0)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert fedavg["summary"]["bytes_up"] == ROUNDS * CLIENTS * model_bytes
    assert fedavg["summary"]["bytes_down"] == ROUNDS * CLIENTS * model_bytes
    assert fedavg["summary"]["eval_bytes_down"] == ROUNDS * CLIENTS * model_bytes
    assert fedavg["summary"]["bytes_total"] > 10 * kta["summary"]["bytes_total"]

    # ... and the ServerApp kept the final global model; it scores what the run reported
    kept = load_personalized(fedavg_dir / "global-model.pt", {"strategy": "fedavg", "partition_id": -1})
    data = load_client_data(cfg.replace(reference_size=N_REF, test_size=200), 0, CLIENTS)
    ours = evaluate(kept, data.test.x, data.test.y, data.label_distribution, torch.device("cpu"))
    assert ours.accuracy == pytest.approx(fedavg["summary"]["final_global_accuracy"], abs=1e-9)
    _check_tracked(kta_dir, kta, ["results.json", "rounds", "rounds.csv"])
    _check_tracked(fedavg_dir, fedavg, ["global-model.pt", "results.json", "rounds", "rounds.csv"])


def _check_server_model(out: Path, res: dict, log: str) -> None:
    """The server's global model (``server-model``): its accuracy in every round's line
    and row, and kept as ``global-model.pt``, which scores what the run reported."""
    server = [row["server-global-accuracy"] for row in res["rounds"]]
    assert all(0.0 < acc <= 1.0 for acc in server)
    assert f"server-acc {server[-1]:.4f} |" in log
    assert res["summary"]["final_server_global_accuracy"] == server[-1]
    (run_dir,) = [p.parent for p in out.glob("*/results.json")]
    kept = load_personalized(run_dir / "global-model.pt", {"strategy": "kta", "partition_id": -1})
    cfg = RunConfig().replace(reference_size=N_REF, test_size=200)
    data = load_client_data(cfg, 0, CLIENTS)
    assert evaluate(kept, data.test.x, data.test.y, data.label_distribution,
                    torch.device("cpu")).accuracy == pytest.approx(server[-1], abs=1e-9)


def _check_tracked(run_dir: Path, res: dict, artifacts: list[str]) -> None:
    """The run's MLflow run, read back through MLflow's client API: its config, every
    round's accuracies and bytes as the results report them, the market's decisions per
    round (kta) and the run's files."""
    from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

    saved = json.loads((run_dir / TRACKING_FILE).read_text())
    assert saved["tracking_uri"] == local_store_uri(run_dir.parent)
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["strategy"] == res["config"]["strategy"]
    for key in ("personalized-accuracy", "global-accuracy", "cum_bytes_up", "cum_bytes_down"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, ROUNDS + 1))
        assert [m.value for m in history] == pytest.approx([row[key] for row in res["rounds"]])
    if res["config"]["strategy"] == "kta":
        distilled = client.get_metric_history(run.info.run_id, "decisions/distill_count")
        assert [m.value for m in distilled] == [
            res["train_metrics"][str(r)]["distilling-clients"] for r in range(1, ROUNDS + 1)]
    assert sorted(f.path for f in client.list_artifacts(run.info.run_id)) == artifacts


def test_deployment_superlink_supernodes_mixed_models(tmp_path, app_dir):
    """flower-superlink --insecure + 2 flower-supernode processes; clients run mlp and cnn."""
    out = tmp_path / "out"
    with LocalFederation(tmp_path, 2) as fed:
        proc = fed.submit(
            app_dir, {**SMALL, "strategy": "kta", "models": "mlp,cnn", "min-nodes": 2,
                      "output-dir": str(out)},
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (res,) = read_results(out)
    assert res["config"]["models"] == "mlp,cnn"
    assert [row["round"] for row in res["rounds"]] == [1, 2]
    assert all(row["clients_evaluated"] == 2 and row["failed"] == 0 for row in res["rounds"])
    assert res["summary"]["bytes_up"] == ROUNDS * 2 * N_REF * C * 4
    assert len(res["summary"]["bytes_per_node"]) == 2
    assert all(key.split(" ")[1].split(".")[0] in ("logits", "targets")
               for key in res["summary"]["wire_manifest"])


@pytest.mark.parametrize("preset", ["cifar10_simplecnn", "cifar10_resnet18", "agnews", "femnist"])
def test_presets_shortened_in_simulation(tmp_path, app_dir, shared_datasets, preset):
    """Each paper preset, from the real data, shortened: 1 round, 2 clients, small splits."""
    out = tmp_path / "out"
    cfg = load_preset(preset, {
        "num-server-rounds": 1, "min-nodes": 2, "max-train-size": 64, "reference-size": 100,
        "test-size": 0 if preset == "femnist" else 100, "local-epochs": 1, "tracking": "none",
        "data-path": str(shared_datasets / load_preset(preset).data_path),
        "output-dir": str(out),
    })
    with LocalFederation(tmp_path, 2, simulation=True) as fed:
        proc = fed.submit(app_dir, cfg.to_flwr())
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "[kta] round 1/1" in proc.stdout
    (res,) = read_results(out)
    assert res["config"]["dataset"] == cfg.dataset and res["config"]["models"] == cfg.models
    (row,) = res["rounds"]
    assert row["clients_evaluated"] == 2 and row["failed"] == 0
    classes = {"agnews": 4, "femnist": 62}.get(preset, 10)
    assert res["summary"]["bytes_up"] == 2 * 100 * classes * 4


def test_simulation_parameter_baselines_bytes(tmp_path, app_dir):
    """The compressed-update and personalization baselines in one simulation federation
    (SA-PEF's and Ditto's bytes are checked on the resume tests' uninterrupted runs)."""
    out, models = tmp_path / "out", tmp_path / "models"
    runs = [("fedavg-topk", {"topk-fraction": 0.01}),
            ("fedkd", {"models": "mlp", "student-model": "cnn"}),
            ("fedavg-ft", {}), ("fedrep", {"head-epochs": 1})]
    with LocalFederation(tmp_path, CLIENTS, simulation=True) as fed:
        for strategy, extra in runs:
            cfg = {**SMALL, **extra, "strategy": strategy, "output-dir": str(out / strategy),
                   "model-dir": str(models / strategy)}
            proc = fed.submit(app_dir, cfg)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            assert f"[{strategy}] round {ROUNDS}/{ROUNDS}" in proc.stdout
    results = {name: read_results(out / name)[0] for name, _ in runs}
    for name, res in results.items():
        _check_common(res, name)
    check_compressed(results["fedavg-topk"], ROUNDS, CLIENTS, topk_fraction=0.01)
    # FedKD: SVD factors of the student's (cnn) updates; the teacher (mlp) never leaves.
    fedkd = results["fedkd"]
    check_compressed(fedkd, ROUNDS, CLIENTS, topk_fraction=None)
    manifest = fedkd["summary"]["wire_manifest"]
    assert any(key.startswith("train/up update.") and key.split()[1].endswith(".u") for key in manifest)
    assert fedkd["summary"]["eval_bytes_down"] == 0
    assert fedkd["summary"]["bytes_up"] < ROUNDS * CLIENTS * 4 * (16 * 9 + 16 + 32 * 16 * 9 + 32 + 32 * 16 * 10 + 10)
    for name in ("fedavg-ft", "fedrep"):
        check_shared_model(results[name], ROUNDS, CLIENTS, models / name)
    assert (next((out / "fedavg-ft").glob("*/global-model.pt"))).is_file()  # fedavg-ft's global model
    assert not list((out / "fedrep").glob("*/global-model.pt"))  # FedRep has no whole global model
