"""The peers for mixed fleets in Flower's simulation engine: HeteroFL, FedProto and the
common-architecture FedAvg on a ``tiers3`` fleet (digits: cnn, mlp, resnet8), with the
exact bytes each tier sends and receives. Checked through the results files."""

import math

import pytest

from kta_flwr.config import RunConfig
from kta_flwr.task.checkpoint import read_checkpoint
from kta_flwr.task.models import ModelSpec, build_model
from kta_flwr.tools.federation import LocalFederation
from kta_flwr.tools.inspect import inspect_run
from tests.conftest import read_results

pytestmark = pytest.mark.slow

ROUNDS, CLIENTS, C, DIM = 2, 3, 10, 64
SMALL = {"num-server-rounds": ROUNDS, "reference-size": 100, "test-size": 200, "local-epochs": 1,
         "fleet": "tiers3", "tracking": "none"}
DIGITS = ModelSpec((1, 8, 8), C)


def _bytes(name: str, width: float = 1.0) -> int:
    """Bytes of a model's state dict (every array, as Flower sends it)."""
    state = build_model(name, DIGITS, 0, width=width).state_dict()
    return sum(value.numel() * value.element_size() for value in state.values())


def test_heterofl_fedproto_and_common_fedavg_on_a_tiers3_fleet(tmp_path, app_dir):
    out = tmp_path / "out"
    runs = ("heterofl", "fedproto", "fedavg-common")
    with LocalFederation(tmp_path, CLIENTS, simulation=True) as fed:
        for strategy in runs:
            cfg = {**SMALL, "strategy": strategy, "output-dir": str(out / strategy),
                   "model-dir": str(tmp_path / "models" / strategy)}
            proc = fed.submit(app_dir, cfg)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            assert f"[{strategy}] round {ROUNDS}/{ROUNDS}" in proc.stdout
    results = {name: read_results(out / name)[0] for name in runs}
    for name, res in results.items():
        assert all(row["clients_evaluated"] == CLIENTS and row["failed"] == 0 for row in res["rounds"]), name
        assert not math.isnan(res["summary"]["final_personalized_accuracy"])

    # HeteroFL: each tier downloads (train and evaluate) and uploads exactly its sub-model
    # of the resnet8; the full-width global model is kept.
    tiers = results["heterofl"]["summary"]["tiers"]
    for (tier, stats), rate in zip(tiers.items(), (0.25, 0.5, 1.0), strict=True):
        size = _bytes("resnet8", rate)
        assert stats["model"] == f"resnet8@{rate:g}", tier
        assert (stats["bytes_up"], stats["bytes_down"]) == (ROUNDS * size, 2 * ROUNDS * size), tier
    assert tiers["small"]["bytes_up"] < tiers["medium"]["bytes_up"] < tiers["large"]["bytes_up"]
    (saved,) = (out / "heterofl").glob("*/global-model.pt")
    assert read_checkpoint(saved).meta.architecture == "resnet8"
    assert inspect_run(saved.parent)["drawn"] == ["client_accuracy.png", "tier_accuracy.png"]
    assert (saved.parent / "tier_accuracy.png").stat().st_size > 5_000

    # FedProto: per class a client holds, d float32 and its int32 id up; the global
    # prototypes (every class some client holds) down from round 2; nothing to evaluate.
    summary = results["fedproto"]["summary"]
    per_class = DIM * 4 + 4
    assert summary["bytes_up"] % per_class == 0
    assert summary["bytes_up"] <= ROUNDS * CLIENTS * C * per_class
    assert summary["bytes_down"] == (ROUNDS - 1) * CLIENTS * C * per_class  # digits: all 10 held
    assert summary["eval_bytes_down"] == 0
    assert sum(t["bytes_up"] for t in summary["tiers"].values()) == summary["bytes_up"]

    # Common FedAvg: one client per tier, so the largest tier's resnet8 is the common
    # architecture; only its client sends and receives weights, the others train alone.
    tiers = results["fedavg-common"]["summary"]["tiers"]
    size = _bytes("resnet8")
    assert (tiers["large"]["bytes_up"], tiers["large"]["bytes_down"]) == (ROUNDS * size, 2 * ROUNDS * size)
    assert all(tiers[t]["bytes_up"] == tiers[t]["bytes_down"] == 0 for t in ("small", "medium"))
    (saved,) = (out / "fedavg-common").glob("*/global-model.pt")
    assert read_checkpoint(saved).meta.architecture == "resnet8"
    assert RunConfig(strategy="fedavg-common", fleet="tiers3").common_architecture(CLIENTS) == "resnet8"
