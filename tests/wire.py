"""Exact-byte checks of the parameter strategies' runs, shared by the tests whose runs
they read (``test_flower_runs.py``, ``test_resume.py``): one run serves every check that
can read it, since each ``flwr run`` costs ~25 s of CPU."""

from __future__ import annotations

from pathlib import Path

#: The digits MLP (64 -> 512 -> 512 -> 10), in float32 values.
MLP_VALUES = 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
#: Its last layer, which FedRep keeps on the node.
MLP_HEAD_VALUES = 512 * 10 + 10


def check_compressed(res: dict, rounds: int, clients: int, topk_fraction: float | None) -> None:
    """A compressed-update run (fedavg-topk, sapef, fedkd): downlink = the per-round
    compressed aggregates (nothing in round 1, nothing dense after version 0, which
    clients build from the seed); with ``topk_fraction``, uplink = k int32 indices +
    k float32 values per client and round, and error feedback on."""
    downlink = [res["train_metrics"][str(r)]["downlink-update-bytes"] for r in range(1, rounds)]
    assert res["summary"]["bytes_down"] == clients * sum(downlink)
    assert not any("global.values" in key for key in res["summary"]["wire_manifest"])
    if topk_fraction is not None:
        k = round(topk_fraction * MLP_VALUES)
        assert res["summary"]["bytes_up"] == rounds * clients * k * 8
        assert res["summary"]["wire_manifest"][f"train/up update.idx int32[{k}]"] == rounds * clients
        assert res["train_metrics"]["1"]["residual-norm"] > 0  # the residual grows from zero


def check_shared_model(res: dict, rounds: int, clients: int, models: Path) -> None:
    """fedavg-ft, Ditto and FedRep: the shared model each way every round, and the
    evaluation broadcast (FedRep: the body, the MLP without its last layer); every
    node keeps its personal model on disk under ``models``."""
    name = res["config"]["strategy"]
    values = MLP_VALUES - (MLP_HEAD_VALUES if name == "fedrep" else 0)
    for key in ("bytes_up", "bytes_down", "eval_bytes_down"):
        assert res["summary"][key] == rounds * clients * 4 * values, (name, key)
    assert len(list(models.glob(f"*/{name}.pt"))) == clients  # a model per node
