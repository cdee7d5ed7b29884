"""Resume for every strategy family, with real Flower processes: a federation SIGKILLed
after round 2 and continued with ``resume-from`` ends with the uninterrupted run's
summary and bytes, to the last bit. The market family's case (kta, with an orphaned
ServerApp and a damaged checkpoint) is in test_faults.py; here the stock family
(FedAvg, Flower's strategy behind our seam), the compressed family (SA-PEF: the nodes'
error-feedback residuals and model versions), and the personalization family under DP
(Ditto with ``dp-epsilon``: the personal models, and each node's privacy ledger, whose
run and lifetime ε after the resumed run equal the uninterrupted run's).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kta_flwr.tools.faults import rounds_done, wait_for_rounds
from kta_flwr.tools.federation import LocalFederation
from tests.conftest import read_results
from tests.wire import check_compressed, check_shared_model

pytestmark = pytest.mark.slow

CLIENTS, ROUNDS = 3, 4
BASE = {"reference-size": 100, "test-size": 200, "local-epochs": 1, "min-nodes": CLIENTS,
        "num-server-rounds": ROUNDS, "tracking": "none"}
CASES = {
    "stock": {"strategy": "fedavg"},
    "compressed": {"strategy": "sapef", "topk-fraction": 0.01, "sapef-alpha": 0.5},
    "personal-dp": {"strategy": "ditto", "dp-epsilon": 4.0},
}
#: What must be equal, bit for bit.
SUMMARY_KEYS = ("final_personalized_accuracy", "final_global_accuracy", "bytes_up", "bytes_down",
                "bytes_total", "rounds_completed", "samples")


def _config(folder: Path, case: str) -> dict:
    return {**BASE, **CASES[case], "output-dir": str(folder / "out"), "model-dir": str(folder / "models")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_federation_resumes_to_the_uninterrupted_result(case, tmp_path, app_dir):
    """Each case is killed after round 2, resumed in a new federation, and compared with
    the same config run without a fault in that federation (each case on its own, so
    that pytest-xdist can run the cases side by side)."""
    cfg = _config(tmp_path, case)
    with LocalFederation(tmp_path / "fed-a", CLIENTS, simulation=True) as first:
        first.launch(app_dir, cfg)
        wait_for_rounds(tmp_path / "out", 2, timeout=300)
        first.kill()  # the ServerApp, the simulation and the SuperLink die at once
    (run_dir,) = [p.parent for p in (tmp_path / "out").glob("*/server-state.json")]
    assert 2 <= rounds_done(tmp_path / "out") < ROUNDS, "the run ended before it could be killed"
    with LocalFederation(tmp_path / "fed-b", CLIENTS, simulation=True) as second:
        proc = second.submit(app_dir, {**cfg, "resume-from": str(run_dir)})
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        whole = second.submit(app_dir, _config(tmp_path / "whole", case))
        assert whole.returncode == 0, whole.stdout[-4000:] + whole.stderr[-4000:]
    (resumed,) = read_results(tmp_path / "out")
    (reference,) = read_results(tmp_path / "whole" / "out")
    assert sum(r["restore_warnings"] for r in resumed["rounds"]) == 0  # every node found its state
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, ROUNDS + 1))
    for key in SUMMARY_KEYS:
        assert resumed["summary"][key] == reference["summary"][key], key
    for key in ("personalized-accuracy", "global-accuracy", "cum_bytes_up", "cum_bytes_down"):
        assert [r[key] for r in resumed["rounds"]] == [r[key] for r in reference["rounds"]], key
    # The uninterrupted run's exact bytes (SA-PEF: Top-k with error feedback; Ditto under
    # DP: FedAvg's, a personal model per node), read here rather than from runs of their own.
    if case == "compressed":
        check_compressed(reference, ROUNDS, CLIENTS, topk_fraction=CASES[case]["topk-fraction"])
    if case == "personal-dp":
        check_shared_model(reference, ROUNDS, CLIENTS, tmp_path / "whole" / "models")
    if "dp-epsilon" in CASES[case]:
        for key in ("dp_epsilon", "dp_lifetime_epsilon"):
            assert resumed["summary"][key] == reference["summary"][key], key
            assert max(resumed["summary"][key].values()) <= CASES[case]["dp-epsilon"]
