"""The per-round decision files of a run folder and the inspect tool's reading of them."""

from __future__ import annotations

import numpy as np
import pytest

from kta_flwr.flower.round_log import (
    dense_weights,
    evaluation_arrays,
    market_arrays,
    read_rounds,
    round_file,
    write_round,
)
from kta_flwr.maths.market import MarketParams, class_prior, run_market
from kta_flwr.tools.inspect import main as inspect_main
from tests.test_market_scale import KTA, _clients


@pytest.mark.parametrize("top", [64, 3])
def test_round_file_keeps_the_market_decisions(tmp_path, top):
    logits, labels, held_out = _clients(0, 12)
    out = run_market(logits, labels, MarketParams(**KTA), held_out)
    np.testing.assert_allclose(out.priors, class_prior(logits - logits.mean(-1, keepdims=True)), atol=1e-6)
    arrays = market_arrays(out, range(100, 112), [True] * 11 + [False], [40] * 11 + [0],
                           [4 * int(go) for go in out.distill], top=top,
                           scored_rows=np.flatnonzero(held_out)[::-1])
    clients = [{"partition-id": 100 + k, "personalized-accuracy": 0.5, "global-accuracy": 0.25}
               for k in range(12)]
    path = write_round(tmp_path, 3, {**arrays, **evaluation_arrays(clients)})
    assert path == round_file(tmp_path, 3) and path.name == "round-0003.npz"
    assert not list(path.parent.glob("*.tmp*"))  # written through a temporary file
    back = read_rounds(tmp_path)[3]
    dense = dense_weights(back)
    if top >= 12:  # every weight kept
        np.testing.assert_allclose(dense, out.weights, atol=1e-7)
    else:  # the 3 largest per student, largest first
        assert (np.count_nonzero(dense, axis=1) <= 3).all()
        np.testing.assert_allclose(back["weight"][:, 0], out.weights.max(axis=1), atol=1e-7)
    np.testing.assert_array_equal(back["tau"], out.tau)
    np.testing.assert_array_equal(back["distill"], out.distill)
    assert back["uploaded"].sum() == 11 and back["bytes_up"].sum() == 440
    np.testing.assert_array_equal(back["scored_rows"], np.flatnonzero(held_out))  # ascending
    np.testing.assert_array_equal(back["eval_partition"], np.arange(100, 112))
    assert write_round(tmp_path, 4, {}) is None  # nothing to keep: no file


def test_inspect_names_a_folder_without_round_files(tmp_path, capsys):
    assert inspect_main([str(tmp_path)]) == 2
    assert f"no round files in {tmp_path / 'rounds'}" in capsys.readouterr().err
