"""A real SuperNode running a rogue ClientApp (attack 'malformed': NaN logits in round 1,
metrics without 'num-examples' in round 2, oversized logits after) next to three honest
SuperNodes on a real SuperLink: the run completes, every rogue reply is dropped at the
boundary and counted as failed, and the market only ever prices the honest nodes."""

from pathlib import Path

import pytest

from kta_flwr.client.attacks import attackers
from kta_flwr.config import RunConfig
from kta_flwr.tools.federation import LocalFederation
from tests.conftest import read_results

pytestmark = pytest.mark.slow

NODES, ROUNDS = 3, 3


def test_a_rogue_supernode_cannot_stop_or_skew_the_honest_nodes(tmp_path, app_dir):
    cfg = RunConfig(
        num_server_rounds=ROUNDS, min_nodes=NODES, reference_size=100, test_size=200,
        local_epochs=1, distill_epochs=1, attack="malformed", attack_fraction=0.34,
        output_dir=str(tmp_path / "out"), model_dir=str(tmp_path / "models"), tracking="none",
    )
    (rogue,) = attackers(cfg, NODES)
    with LocalFederation(tmp_path / "fed", NODES) as fed:
        proc = fed.submit(app_dir, cfg.to_flwr())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (res,) = read_results(Path(cfg.output_dir))
    assert res["summary"]["rounds_completed"] == ROUNDS
    assert [row["rejected"] for row in res["rounds"]] == [1] * ROUNDS
    assert [row["failed"] for row in res["rounds"]] == [1] * ROUNDS
    for server_round in range(1, ROUNDS + 1):
        metrics = res["train_metrics"][str(server_round)]
        assert metrics["replies"] == NODES - 1 and metrics["market-clients"] == NODES - 1
    for reason in ("NaN/inf values", "metric 'num-examples': is missing", "has shape (400, 10)"):
        assert reason in log, reason
    honest = [c for c in res["clients_last_round"] if int(c["partition-id"]) != rogue]
    assert len(honest) == NODES - 1
    assert all(0.5 < c["personalized-accuracy"] <= 1.0 for c in honest)
