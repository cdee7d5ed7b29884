"""The ServerApp's run: config and data checks, the strategy, the rounds, and what the run
keeps (results and the server's checkpoint after every round, the final global model).

A new run writes into a new ``<output-dir>/<timestamp>-<strategy>/`` folder. With
``resume-from`` it continues the run in that folder after its last completed round: it
restores the strategy, the byte meter, the results rows and the RNGs from the folder's
``server-state.pkl``, asks every node which partition it holds (the node ids are new),
and stamps the original run's id (the lineage) into every instruction, so each node
restores its model of that round from disk. See ``docs/running.md``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.factory import build_strategy
from kta_flwr.flower import protocol
from kta_flwr.flower.metering import ByteMeter, MeteredGrid
from kta_flwr.flower.results import RunRecorder
from kta_flwr.flower.run_state import RunState, check_resumable, load_run_state, save_run_state
from kta_flwr.flower.strategies.base import FederationError, NodeStrategy, wait_for_nodes
from kta_flwr.flower.strategies.compressed import CompressedUpdates
from kta_flwr.flower.strategies.market import KnowledgeMarket
from kta_flwr.flower.strategies.rounds import RoundsFrom
from kta_flwr.flower.validation import QUERY, QUERY_METRICS, ReplyScreen, ReplySpec
from kta_flwr.maths.update_compression import ParamLayout
from kta_flwr.task.checkpoint import ModelMeta, save_checkpoint
from kta_flwr.task.market_torch import market_kernels
from kta_flwr.task.models import build_model, head_keys
from kta_flwr.task.splits import CentralSplits, load_splits, partition_indices
from kta_flwr.task.text import minilm_path
from kta_flwr.task.training import load_vector

#: The final global model of the parameter strategies, next to ``results.json``.
GLOBAL_MODEL_FILE = "global-model.pt"


def _check_federation(cfg: RunConfig, splits: CentralSplits, grid: Grid) -> None:
    """Data-dependent checks that need the connected nodes."""
    nodes = len(list(grid.get_node_ids()))
    # Raises ConfigError for more clients than samples/writers or a failed Dirichlet draw.
    partition_indices(splits.train.y, nodes, cfg, splits.train_groups)
    if "minilm" in cfg.model_names:
        minilm_path()  # ConfigError if the pretrained weights are not installed


def _initial_arrays(cfg: RunConfig, splits: CentralSplits) -> ArrayRecord:
    """The shared model built from the run's seed (FedAvg/FedProx send it, FedRep its body;
    the compressed strategies keep it as version 0, which clients build alike); nothing
    for the market."""
    if cfg.is_market:
        return ArrayRecord()
    model = build_model(cfg.shared_model, splits.spec_for(cfg), cfg.seed, private=cfg.private)
    head = head_keys(model) if cfg.shares_body_only else frozenset()
    return ArrayRecord(OrderedDict((k, v) for k, v in model.state_dict().items() if k not in head))


def run(grid: Grid, context: Context) -> None:
    """Run (or resume) ``num-server-rounds`` rounds of the configured strategy.

    Raises:
        ConfigError: a bad config, missing data, or a checkpoint that cannot be resumed
            (logged first: nothing was trained).
        FederationError: too few nodes after ``node-wait-timeout`` (the results of the
            completed rounds are on disk).
    """
    try:
        cfg = parse_run_config(context.run_config)
        splits = load_splits(cfg)
        _check_federation(cfg, splits, grid)
        kernels = market_kernels(cfg.market_device)  # ConfigError: 'cuda' without a GPU
        saved = _resumable_state(cfg)
    except ConfigError as err:
        log(ERROR, "Invalid configuration, nothing was trained: %s", err)
        raise ConfigError(str(err)) from None

    random.seed(cfg.seed)  # Flower's stock strategies sample nodes with `random`
    np.random.seed(cfg.seed)
    meter = ByteMeter()
    run_dir = Path(cfg.resume_from).expanduser() if saved else None
    recorder = RunRecorder(cfg, meter, run_id=grid.run.run_id, run_dir=run_dir,
                           fab_hash=grid.run.fab_hash)
    initial_arrays = _initial_arrays(cfg, splits)
    strategy = build_strategy(
        cfg,
        initial_arrays=initial_arrays,
        reference_labels=splits.reference.y,
        num_classes=splits.num_classes,
        fingerprint=splits.reference_fingerprint,
        evaluate_metrics_aggr_fn=recorder.aggregate_evaluate,
        train_metrics_aggr_fn=recorder.aggregate_train,
        max_examples=max(len(splits.train.y), len(splits.test.y)),
        market_kernels=kernels,
    )
    metered = MeteredGrid(grid, meter)
    lineage, first = grid.run.run_id, 1
    arrays = ArrayRecord() if cfg.is_compressed else initial_arrays
    if saved is not None:
        lineage, first = saved.lineage, saved.round + 1
        arrays = _resume(saved, strategy, recorder, metered, cfg) or arrays
    if isinstance(strategy, NodeStrategy) and lineage != grid.run.run_id:
        strategy.lineage = lineage
    log(INFO, "kta-flwr: strategy=%s dataset=%s reference=%d test=%d train-pool=%d%s",
        cfg.strategy, cfg.dataset, len(splits.reference.y), len(splits.test.y),
        len(splits.train.y), f"; resuming run {lineage} at round {first}" if saved else "")

    latest = {"arrays": arrays}  # the stock strategies' global model after the last round
    rounds = RoundsFrom(strategy, first, recorder.note_train_metrics)

    def end_round(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if local_round == 0:  # Strategy.start calls it once before the first round
            return None
        server_round = rounds.true_round(local_round)
        decisions = strategy.take_round_record() if isinstance(strategy, KnowledgeMarket) else None
        out = recorder.end_round(server_round, arrays, rejected=strategy.screen.drain(),
                                 decisions=decisions)
        save_run_state(recorder.ensure_run_dir(), RunState.capture(
            round=server_round, lineage=lineage, config=cfg.to_flwr(),
            strategy=strategy.state_dict() if isinstance(strategy, NodeStrategy) else {},
            arrays={k: v.numpy() for k, v in arrays.items()}, recorder=recorder.state(),
        ))
        recorder.write()
        latest["arrays"] = arrays
        return out

    remaining = cfg.num_server_rounds - first + 1
    try:
        if remaining > 0:
            rounds.start(
                grid=metered, initial_arrays=arrays, num_rounds=remaining,
                timeout=cfg.round_timeout, train_config=ConfigRecord({}),
                evaluate_config=ConfigRecord({}), evaluate_fn=end_round,
            )
    except FederationError as err:
        recorder.write()
        log(ERROR, "kta-flwr: run stopped after %d rounds: %s; results so far in %s",
            len(recorder.rows), err, recorder.ensure_run_dir())
        raise
    _save_global_model(cfg, splits, strategy, recorder, latest["arrays"], (grid.run.run_id, lineage))
    run_dir = recorder.write()
    summary = recorder.summary()
    log(INFO, "kta-flwr: %s finished: personalized %.4f, global %.4f, %.4f MiB total; "
        "results in %s", cfg.strategy, summary["final_personalized_accuracy"],
        summary["final_global_accuracy"], summary["mib_total"], run_dir)


def _resumable_state(cfg: RunConfig) -> RunState | None:
    """The checkpoint ``resume-from`` names, checked against ``cfg`` (None: a new run)."""
    if not cfg.resume_from:
        return None
    saved = load_run_state(Path(cfg.resume_from).expanduser())
    check_resumable(saved.config, cfg, saved.round)
    return saved


def _resume(
    saved: RunState, strategy: Strategy, recorder: RunRecorder, grid: MeteredGrid, cfg: RunConfig
) -> ArrayRecord | None:
    """Restore what ``saved`` holds; map the new node ids to the saved partitions. Returns
    the global model's arrays (stock strategies), else None."""
    recorder.restore(saved.recorder)
    saved.restore_rngs()
    if isinstance(strategy, NodeStrategy):
        strategy.load_state_dict(saved.strategy)
        strategy.adopt(_partitions(grid, cfg, saved.round))
    if saved.arrays and not cfg.is_compressed:
        return ArrayRecord({k: np.asarray(v) for k, v in saved.arrays.items()})
    return None


def _partitions(grid: Grid, cfg: RunConfig, completed: int) -> dict[int, int]:
    """Ask every connected node which partition it holds: node id -> partition id (the
    replies pass the boundary checks; a partition is claimed once)."""
    nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait_timeout, cfg.min_round_nodes)
    config = ConfigRecord({"server-round": completed})
    screen = ReplyScreen()
    screen.expect(QUERY, nodes)
    replies = grid.send_and_receive(
        [Message(RecordDict({protocol.CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY)
         for n in nodes],
        timeout=cfg.round_timeout,
    )
    found = {r.node_id: r.partition
             for r in screen.screen(completed, QUERY, replies, ReplySpec(QUERY_METRICS)).valid}
    log(INFO, "kta-flwr: resumed run: %d of %d nodes reported their partition", len(found), len(nodes))
    return found


def _save_global_model(  # pylint: disable=too-many-arguments
    cfg: RunConfig, splits: CentralSplits, strategy: Strategy, recorder: RunRecorder,
    arrays: ArrayRecord, ids: tuple[int, int],
) -> None:
    """The final global model of FedAvg/FedProx, fedavg-ft and Ditto (the last aggregate)
    or fedavg-topk/SA-PEF (the model log's last version) next to ``results.json`` (FedRep
    has no whole global model: the heads stay on the nodes)."""
    if cfg.is_market or cfg.has_private_teacher or cfg.shares_body_only or not recorder.rows:
        return
    spec = splits.spec_for(cfg)
    model = build_model(cfg.shared_model, spec, cfg.seed, private=cfg.private)
    if isinstance(strategy, CompressedUpdates):
        load_vector(model, ParamLayout.of(model.state_dict()), strategy.log.vector)
    elif len(arrays):
        model.load_state_dict(arrays.to_torch_state_dict())
    else:
        return
    run_id, lineage = ids
    last = recorder.rows[-1]
    meta = ModelMeta(
        architecture=cfg.shared_model, num_classes=spec.num_classes,
        input_shape=tuple(spec.input_shape), vocab_size=spec.vocab_size,
        finetune_layers=spec.finetune_layers, fingerprint=splits.reference_fingerprint,
        strategy=cfg.strategy, partition_id=-1, run_id=run_id, lineage=lineage,
        round=int(last["round"]), rounds_trained=int(last["round"]),
        accuracies={k: float(last[k]) for k in ("personalized-accuracy", "global-accuracy")},
        private=cfg.private,
    )
    save_checkpoint(recorder.ensure_run_dir() / GLOBAL_MODEL_FILE, meta, model.state_dict(),
                    keep_previous=False)
