"""The ServerApp's run: config and data checks, the strategy, the rounds, and what the run
keeps (results and the server's checkpoint after every round, the final global model).

A new run writes into a new ``<output-dir>/<timestamp>-<strategy>/`` folder. With
``resume-from`` it continues the run in that folder after its last completed round: it
restores the strategy, the byte meter, the results rows and the RNGs from the folder's
``server-state.json`` (:mod:`kta_flwr.flower.run_state`), asks every node which partition
it holds (the node ids are new), and stamps the original run's id (the lineage) into
every instruction, so each node restores its state of that round from disk. The run
folder has one writer at a time (:class:`~kta_flwr.storage.FolderLock`): a resume is
refused while another live process (an orphaned ServerApp) holds it. Every strategy is
driven through the one interface :class:`~kta_flwr.flower.strategies.base.NodeStrategy`.
See ``docs/running.md``.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import OrderedDict
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from kta_flwr.config import COMMON, SUBMODELS, ConfigError, RunConfig, parse_run_config
from kta_flwr.factory import build_strategy, node_options
from kta_flwr.flower.metering import ByteMeter, MeteredGrid
from kta_flwr.flower.results import SERVER_SECONDS, RunRecorder
from kta_flwr.flower.run_state import (
    STATE_FILE,
    RunState,
    check_resumable,
    load_run_state,
    save_run_state,
)
from kta_flwr.flower.strategies.base import FederationError, NodeStrategy, ask_partitions, wait_for_nodes
from kta_flwr.flower.strategies.rounds import RoundsFrom
from kta_flwr.maths.market_kernels import MarketKernels
from kta_flwr.server.global_model import SERVER_GLOBAL, ServerModel
from kta_flwr.server.tracking import RunTracker, tracker_for
from kta_flwr.storage import FolderBusy, FolderLock
from kta_flwr.task.checkpoint import ModelMeta, save_checkpoint
from kta_flwr.task.market_torch import market_kernels
from kta_flwr.task.models import build_model, head_keys
from kta_flwr.task.splits import CentralSplits, load_splits, partition_indices
from kta_flwr.task.text import minilm_path
from kta_flwr.task.training import resolve_device

#: The final global model of the parameter strategies, next to ``results.json``.
GLOBAL_MODEL_FILE = "global-model.pt"


def _check_federation(cfg: RunConfig, splits: CentralSplits, grid: Grid) -> None:
    """Data-dependent checks that need the connected nodes."""
    nodes = len(list(grid.get_node_ids()))
    # Raises ConfigError for more clients than samples/writers or a failed Dirichlet draw.
    partition_indices(splits.train.y, nodes, cfg, splits.train_groups)
    if "minilm" in cfg.model_names:
        minilm_path()  # ConfigError if the pretrained weights are not installed


def _initial_arrays(cfg: RunConfig, splits: CentralSplits, architecture: str) -> ArrayRecord:
    """The shared model (``architecture``) built from the run's seed (FedAvg/FedProx send
    it, FedRep its body; the compressed strategies keep it as version 0, which clients
    build alike); nothing for the market."""
    if cfg.is_market:
        return ArrayRecord()
    model = build_model(architecture, splits.spec_for(cfg), cfg.seed, private=cfg.private)
    head = head_keys(model) if cfg.shares_body_only else frozenset()
    return ArrayRecord(OrderedDict((k, v) for k, v in model.state_dict().items() if k not in head))


def _fleet_size(cfg: RunConfig, grid: Grid) -> int:
    """The fleet's number of partitions: ``min-nodes``, or the nodes connected if more."""
    return max(cfg.min_nodes, len(list(grid.get_node_ids())))


def _global_architecture(cfg: RunConfig, grid: Grid) -> str:
    """The architecture of the global model: ``fedavg-common``'s common one among the
    fleet's partitions (:func:`_fleet_size`), else the config's shared model."""
    if cfg.family == COMMON:
        return cfg.common_architecture(_fleet_size(cfg, grid))
    return cfg.shared_model


def _tier_shapes(cfg: RunConfig, splits: CentralSplits) -> list[dict[str, tuple[int, ...]]]:
    """HeteroFL: each tier's sub-model tensor shapes (its width rate's model); none otherwise."""
    if cfg.family != SUBMODELS:
        return []
    spec = splits.spec_for(cfg)
    return [{name: tuple(value.shape) for name, value in
             build_model(cfg.shared_model, spec, cfg.seed, private=cfg.private, width=rate).state_dict().items()}
            for rate in cfg.tier_width_rates]


def run(grid: Grid, context: Context) -> None:
    """Run (or resume) ``num-server-rounds`` rounds of the configured strategy.

    Raises:
        ConfigError: a bad config, missing data, a checkpoint that cannot be resumed, or
            a run folder another live process holds (logged first: nothing was trained).
        FederationError: too few nodes after ``node-wait-timeout`` (the results of the
            completed rounds are on disk).
    """
    with contextlib.ExitStack() as held:  # the run folder's lock, released on the way out
        try:
            cfg = parse_run_config(context.run_config)
            splits = load_splits(cfg)
            _check_federation(cfg, splits, grid)
            kernels = market_kernels(cfg.market_device)  # ConfigError: 'cuda' without a GPU
            if cfg.resume_from and Path(cfg.resume_from).expanduser().is_dir():
                # before reading it: an orphaned ServerApp may still be writing it
                held.enter_context(_hold(Path(cfg.resume_from).expanduser()))
            saved = _resumable_state(cfg)
            tracker = tracker_for(cfg)  # ConfigError: 'mlflow' without MLflow installed
        except ConfigError as err:
            log(ERROR, "Invalid configuration, nothing was trained: %s", err)
            raise ConfigError(str(err)) from None
        _run(grid, cfg, splits, kernels, saved, held, tracker)


def _run(  # pylint: disable=too-many-arguments,too-many-locals
    grid: Grid, cfg: RunConfig, splits: CentralSplits, kernels: MarketKernels,
    saved: RunState | None, held: contextlib.ExitStack, tracker: RunTracker,
) -> None:
    """The rounds of a run whose config and checkpoint passed the checks."""
    random.seed(cfg.seed)  # Flower's stock strategies shuffle their sample with `random`
    np.random.seed(cfg.seed)
    meter = ByteMeter()
    recorder = RunRecorder(cfg, meter, run_id=grid.run.run_id,
                           run_dir=Path(cfg.resume_from).expanduser() if saved else None,
                           fab_hash=grid.run.fab_hash)
    if saved is None:
        held.enter_context(_hold(recorder.ensure_run_dir()))
    lineage = saved.lineage if saved else grid.run.run_id
    architecture = _global_architecture(cfg, grid)
    num_partitions = _fleet_size(cfg, grid)
    recorder.newcomers = cfg.newcomers(num_partitions)
    strategy = build_strategy(
        cfg,
        initial_arrays=_initial_arrays(cfg, splits, architecture),
        reference_labels=splits.reference.y,
        num_classes=splits.num_classes,
        fingerprint=splits.reference_fingerprint,
        options=node_options(cfg, recorder.aggregate_evaluate, recorder.aggregate_train,
                             max_examples=max(len(splits.train.y), len(splits.test.y)),
                             lineage=saved.lineage if saved else None,
                             num_partitions=num_partitions),
        market_kernels=kernels,
        tier_shapes=_tier_shapes(cfg, splits),
        is_member=lambda partition: cfg.model_for_partition(partition) == architecture,
    )
    metered = MeteredGrid(grid, meter)
    server_model = ServerModel(cfg, splits, resolve_device(cfg.market_device)) if cfg.server_model else None
    first = 1
    if saved is not None:
        first = saved.round + 1
        _resume(saved, strategy, recorder, metered, cfg, server_model)
    if server_model is not None and cfg.newcomer_start == "global":
        strategy.offer_start_model(server_model.arrays())
    tracker.start(recorder.ensure_run_dir(), cfg, {
        "strategy": cfg.strategy, "dataset": cfg.dataset, "kta.lineage": str(lineage),
        "kta.flwr_run_id": str(grid.run.run_id)})
    log(INFO, "kta-flwr: strategy=%s dataset=%s reference=%d test=%d train-pool=%d%s",
        cfg.strategy, cfg.dataset, len(splits.reference.y), len(splits.test.y),
        len(splits.train.y), f"; resuming run {lineage} at round {first}" if saved else "")

    rounds = RoundsFrom(strategy, first, recorder.note_train_metrics)

    def end_round(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        del arrays  # the strategy keeps its global model (start_arrays, state_dict)
        if local_round == 0:  # Strategy.start calls it once before the first round
            return None
        server_round = rounds.true_round(local_round)
        recorder.note_partitions(strategy.partition_of)
        report = strategy.take_round_report()
        extra = {}
        if server_model is not None:
            started = time.perf_counter()
            server_model.learn(server_round, strategy.take_consensus())
            extra[SERVER_GLOBAL] = server_model.accuracy()
            extra[SERVER_SECONDS] = round(time.perf_counter() - started, 4)
            if cfg.newcomer_start == "global":
                strategy.offer_start_model(server_model.arrays())
            if cfg.server_model_teacher_weight > 0:  # one more teacher in next round's targets
                strategy.blend_teacher(server_model.predict, cfg.server_model_teacher_weight)
        out = recorder.end_round(server_round, report, extra)
        tracker.log_round(server_round, recorder.rows[-1], report.decisions)
        save_run_state(recorder.ensure_run_dir(), RunState.capture(
            round=server_round, lineage=lineage, config=cfg.to_flwr(),
            strategy=strategy.state_dict(), recorder=recorder.state(),
            server_model=server_model.state_dict() if server_model is not None else {},
        ))
        recorder.write()
        return out

    remaining = cfg.num_server_rounds - first + 1
    try:
        if remaining > 0:
            rounds.start(
                grid=metered, initial_arrays=strategy.start_arrays(), num_rounds=remaining,
                timeout=cfg.round_timeout, train_config=ConfigRecord({}),
                evaluate_config=ConfigRecord({}), evaluate_fn=end_round,
            )
    except FederationError as err:
        tracker.finish(recorder.write(), failed=True)
        log(ERROR, "kta-flwr: run stopped after %d rounds: %s; results so far in %s",
            len(recorder.rows), err, recorder.ensure_run_dir())
        raise
    except BaseException:
        tracker.finish(recorder.ensure_run_dir(), failed=True)  # e.g. Ctrl-C: closed as failed
        raise
    kept = ((server_model.architecture, server_model.tensors()) if server_model is not None
            else (architecture, strategy.global_model()))
    _save_global_model(cfg, splits, *kept, recorder, (grid.run.run_id, lineage))
    run_dir = recorder.write()
    tracker.finish(run_dir)
    summary = recorder.summary()
    log(INFO, "kta-flwr: %s finished: personalized %.4f, global %.4f, %.4f MiB total; "
        "results in %s", cfg.strategy, summary["final_personalized_accuracy"],
        summary["final_global_accuracy"], summary["mib_total"], run_dir)


def _hold(run_dir: Path) -> FolderLock:
    """This process's lock on ``run_dir`` (one writer per run folder).

    Raises:
        ConfigError: another live process holds it (naming it).
    """
    try:
        return FolderLock(run_dir).acquire()
    except FolderBusy as err:
        raise ConfigError(
            f"run-config 'resume-from': {err}: a ServerApp still writes that run (one whose "
            "SuperLink died can live on for a minute or two); wait until it exits, or stop it "
            f"(kill {err.holder.get('pid', '<pid>')}), then resume"
        ) from None


def _resumable_state(cfg: RunConfig) -> RunState | None:
    """The checkpoint ``resume-from`` names, checked against ``cfg`` (None: a new run)."""
    if not cfg.resume_from:
        return None
    saved = load_run_state(Path(cfg.resume_from).expanduser())
    check_resumable(saved.config, cfg, saved.round)
    return saved


def _resume(  # pylint: disable=too-many-arguments
    saved: RunState, strategy: NodeStrategy, recorder: RunRecorder, grid: MeteredGrid, cfg: RunConfig,
    server_model: ServerModel | None,
) -> None:
    """Restore what ``saved`` holds; map the new node ids to the saved partitions.

    Raises:
        ConfigError: the saved state does not fit this strategy or server model (a field
            is named).
    """
    try:
        recorder.restore(saved.recorder)
        strategy.load_state_dict(saved.strategy)
        if server_model is not None:
            server_model.load_state_dict(saved.server_model)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"run-config 'resume-from': {Path(cfg.resume_from) / STATE_FILE}: its saved state "
            f"does not fit strategy {cfg.strategy!r} ({type(err).__name__}: {err})") from None
    saved.restore_rngs()
    strategy.adopt(_partitions(grid, cfg, saved.round))


def _partitions(grid: Grid, cfg: RunConfig, completed: int) -> dict[int, int]:
    """Ask every connected node which partition it holds: node id -> partition id (the
    replies pass the boundary checks; a partition is claimed once)."""
    nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait_timeout, cfg.min_round_nodes)
    found = ask_partitions(grid, nodes, completed, cfg.round_timeout)
    log(INFO, "kta-flwr: resumed run: %d of %d nodes reported their partition", len(found), len(nodes))
    return found


def _save_global_model(  # pylint: disable=too-many-arguments
    cfg: RunConfig, splits: CentralSplits, architecture: str, tensors: dict[str, np.ndarray] | None,
    recorder: RunRecorder, ids: tuple[int, int],
) -> None:
    """The strategy's final global model (:meth:`~kta_flwr.flower.strategies.base.NodeStrategy.global_model`:
    FedAvg's family, fedavg-common's and fedavg-ft/Ditto's last aggregate, HeteroFL's
    full-width model, fedavg-topk/SA-PEF's last version; none under FedProto, FedKD or
    FedRep) or the market's server model (``server-model``), a model of
    ``architecture``, next to ``results.json``."""
    if tensors is None or not recorder.rows:
        return
    spec = splits.spec_for(cfg)
    model = build_model(architecture, spec, cfg.seed, private=cfg.private)
    state = model.state_dict()
    state.update({name: torch.from_numpy(np.array(value)) for name, value in tensors.items()})
    model.load_state_dict(state)
    run_id, lineage = ids
    last = recorder.rows[-1]
    meta = ModelMeta(
        architecture=architecture, num_classes=spec.num_classes,
        input_shape=tuple(spec.input_shape), vocab_size=spec.vocab_size,
        finetune_layers=spec.finetune_layers, fingerprint=splits.reference_fingerprint,
        strategy=cfg.strategy, partition_id=-1, run_id=run_id, lineage=lineage,
        round=int(last["round"]), rounds_trained=int(last["round"]),
        accuracies={k: float(last[k]) for k in ("personalized-accuracy", "global-accuracy", SERVER_GLOBAL)
                    if k in last},
        private=cfg.private,
    )
    save_checkpoint(recorder.ensure_run_dir() / GLOBAL_MODEL_FILE, meta, model.state_dict(),
                    keep_previous=False)
