"""The ServerApp: validate the config, build the strategy (:mod:`kta_flwr.factory`), meter
the grid, write results. The round as the server sees it: ``docs/method.md``."""

from __future__ import annotations

import random
from logging import ERROR, INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.factory import build_strategy
from kta_flwr.flower.metering import ByteMeter, MeteredGrid
from kta_flwr.flower.results import RunRecorder
from kta_flwr.task.models import build_model
from kta_flwr.task.splits import CentralSplits, load_splits, partition_indices
from kta_flwr.task.text import minilm_path

app = ServerApp()


def _check_federation(cfg: RunConfig, splits: CentralSplits, grid: Grid) -> None:
    """Data-dependent checks that need the connected nodes."""
    nodes = len(list(grid.get_node_ids()))
    # Raises ConfigError for more clients than samples/writers or a failed Dirichlet draw.
    partition_indices(splits.train.y, nodes, cfg, splits.train_groups)
    if "minilm" in cfg.model_names:
        minilm_path()  # ConfigError if the pretrained weights are not installed


def _initial_arrays(cfg: RunConfig, splits: CentralSplits) -> ArrayRecord:
    """The shared model built from the run's seed (FedAvg/FedProx send it; the compressed
    strategies keep it as version 0, which clients build alike); nothing for the market."""
    if cfg.is_market:
        return ArrayRecord()
    model = build_model(cfg.shared_model, splits.spec_for(cfg), cfg.seed)
    return ArrayRecord(model.state_dict())


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of the configured strategy."""
    try:
        cfg = parse_run_config(context.run_config)
        splits = load_splits(cfg)
        _check_federation(cfg, splits, grid)
    except ConfigError as err:
        log(ERROR, "Invalid configuration, nothing was trained: %s", err)
        raise ConfigError(str(err)) from None

    random.seed(cfg.seed)  # Flower's stock strategies sample nodes with `random`
    np.random.seed(cfg.seed)
    meter = ByteMeter()
    recorder = RunRecorder(cfg, meter, run_id=grid.run.run_id)
    initial_arrays = _initial_arrays(cfg, splits)
    strategy = build_strategy(
        cfg,
        initial_arrays=initial_arrays,
        reference_labels=splits.reference.y,
        num_classes=splits.num_classes,
        fingerprint=splits.reference_fingerprint,
        evaluate_metrics_aggr_fn=recorder.aggregate_evaluate,
        train_metrics_aggr_fn=recorder.aggregate_train,
    )
    log(INFO, "kta-flwr: strategy=%s dataset=%s reference=%d test=%d train-pool=%d",
        cfg.strategy, cfg.dataset, len(splits.reference.y), len(splits.test.y),
        len(splits.train.y))
    result = strategy.start(
        grid=MeteredGrid(grid, meter),
        initial_arrays=ArrayRecord() if cfg.is_compressed else initial_arrays,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
        evaluate_fn=recorder.end_round,
    )
    train_metrics = {
        str(rnd): dict(metrics) for rnd, metrics in result.train_metrics_clientapp.items()
    }
    run_dir = recorder.write(extra={"train_metrics": train_metrics})
    summary = recorder.summary()
    log(INFO, "kta-flwr: %s finished: personalized %.4f, global %.4f, %.4f MiB total; "
        "results in %s", cfg.strategy, summary["final_personalized_accuracy"],
        summary["final_global_accuracy"], summary["mib_total"], run_dir)
