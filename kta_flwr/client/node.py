"""One node's view of one message: its run config, data, device, seeds and state.

A :class:`Node` is built per ClientApp call (data is cached per process by
:mod:`kta_flwr.task.splits`). Models live in the node's ``context.state`` under the keys
below; they never leave the node except as the family's reply says. After every round it
trains, the node also writes them to its own folder on disk (:mod:`kta_flwr.task.checkpoint`),
so they outlive the run and a restart: a node whose state is empty (a restarted SuperNode,
a resumed run, ``warm-start``) restores it from there first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
import torch
from torch import nn

from kta_flwr.client.privacy import NodePrivacy
from kta_flwr.config import MIRRORABLE_DATASETS, NODE_STATE_DISK, ConfigError, RunConfig, parse_run_config
from kta_flwr.factory import update_codec
from kta_flwr.flower import protocol, sync
from kta_flwr.flower.protocol import RESTORE_FILE, RESTORE_REASON
from kta_flwr.flower.timing import PhaseTimer
from kta_flwr.flower.validation import MAX_NOTE
from kta_flwr.maths.update_compression import ParamLayout, UpdateCodec
from kta_flwr.task.checkpoint import (
    CheckpointError,
    ModelMeta,
    SavedModel,
    check_meta,
    check_tensors,
    checkpoint_file,
    read_checkpoint,
    save_checkpoint,
)
from kta_flwr.task.models import build_model
from kta_flwr.task.splits import ClientData, load_client_data
from kta_flwr.task.training import (
    Optim,
    distill,
    evaluate,
    label_mix_weights,
    model_vector,
    resolve_device,
    shifts_and_flips,
    train_supervised,
    training_samples,
)

#: ``context.state`` keys: the client's own model (market, FedKD's private teacher), this
#: node's copy of the shared model and its version (compressed baselines), the
#: error-feedback residual (Top-k, SA-PEF).
MODEL_STATE = "personal-model"
GLOBAL_STATE = "global-model"
VERSION_STATE = "global-version"
RESIDUAL_STATE = "residual"
#: ``context.state`` key of the checkpoint counters (``round``, ``rounds-trained``, accuracies).
META_STATE = "checkpoint-meta"
#: ``context.state`` key of the node's partition (its rows of the training pool), drawn by
#: the run's first message and read by the next ones.
PARTITION_STATE = "partition"
#: Checkpoint extras <-> state keys of the compressed baselines' vectors.
_EXTRA_VECTORS = {"global": GLOBAL_STATE, "residual": RESIDUAL_STATE}
#: Fields a warm start must match (the architecture, the task and the reference set).
WARM_START_FIELDS = ("architecture", "num_classes", "input_shape", "vocab_size", "fingerprint",
                     "private")


def partition_id_of(context: Context) -> int:
    """The node config's ``partition-id``.

    Raises:
        ConfigError: the node config lacks ``partition-id`` or ``num-partitions``.
    """
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ConfigError(
            "node-config needs 'partition-id' and 'num-partitions' (e.g. "
            "flower-supernode --node-config 'partition-id=0 num-partitions=2')"
        )
    return int(node["partition-id"])


class Node:  # pylint: disable=too-many-instance-attributes
    """Everything one handler call needs, read from the Context and the Message.

    Raises:
        ConfigError: a bad run config, a node config without ``partition-id`` and
            ``num-partitions``, or a reference set that differs from the server's.
    """

    def __init__(self, msg: Message, context: Context) -> None:
        self.cfg: RunConfig = parse_run_config(context.run_config)
        node = context.node_config
        self.partition_id = partition_id_of(context)
        kept = context.state.array_records.get(PARTITION_STATE)
        rows = None if kept is None else kept["rows"].numpy()
        self.data: ClientData = load_client_data(
            self.cfg, self.partition_id, int(node["num-partitions"]), rows=rows)
        if rows is None or not np.array_equal(rows, self.data.rows):
            context.state[PARTITION_STATE] = ArrayRecord({"rows": Array(self.data.rows)})
        self.config: ConfigRecord = msg.content.config_records.get(protocol.CONFIG, ConfigRecord())
        self.server_round = int(self.config.get("server-round", 0))
        #: Whether the message carries soft targets (market family).
        self.has_targets = protocol.TARGETS in msg.content.array_records
        expected = self.config.get(protocol.FINGERPRINT)
        if expected is not None and expected != self.data.splits.reference_fingerprint:
            raise ConfigError(
                f"this node's reference set (fingerprint "
                f"{self.data.splits.reference_fingerprint}) differs from the server's "
                f"({expected}): check 'dataset', 'data-path', 'reference-size' and 'seed'"
            )
        self.device = resolve_device(self.cfg.device)
        self.context = context
        # Distinct, reproducible randomness per (seed, partition, round).
        self.seed = self.cfg.seed * 1_000_003 + self.partition_id * 10_007 + self.server_round
        #: Where this node keeps its models: node-config 'model-dir', else
        #: <model-dir>/<node-config 'node-name' or partition-<id>>.
        name = str(node.get("node-name", f"partition-{self.partition_id}"))
        self.model_folder = Path(str(node["model-dir"])).expanduser() if "model-dir" in node \
            else self.cfg.resolved_model_dir() / name
        self.lineage = int(self.config.get(protocol.LINEAGE, context.run_id))
        #: The newest round whose model this message may build on: the previous round's
        #: for a train instruction, this round's for an evaluation.
        self.latest_round = self.server_round - (msg.metadata.message_type == MessageType.TRAIN)
        #: DP-SGD and noisy logits (None: both off), see :mod:`kta_flwr.client.privacy`.
        self.privacy: NodePrivacy | None = None
        if self.cfg.private or self.cfg.logit_noise > 0:
            self.privacy = NodePrivacy(
                self.cfg, num_private=len(self.data.train.y), num_reference=len(self.data.reference.y),
                folder=self.model_folder, lineage=self.lineage, seed=self.seed)
        #: What this node tells the server about the state it restored (a reply's
        #: ``notes``; empty when all went as the run expects).
        self.notes: dict[str, str] = {}
        if self.cfg.keeps_node_model and META_STATE not in context.state.config_records:
            self._restore()

    # --- models -------------------------------------------------------------------------
    def fresh_model(self) -> nn.Module:
        """This partition's architecture (at its width rate under HeteroFL), initialised
        from the run's seed and partition."""
        name = self.cfg.model_for_partition(self.partition_id)
        return build_model(name, self.data.splits.spec_for(self.cfg), self.cfg.seed + self.partition_id,
                           private=self.cfg.private, width=self.cfg.width_of_partition(self.partition_id))

    def personal_model(self) -> nn.Module:
        """The client's own model, restored from the node's state if it trained before."""
        model = self.fresh_model()
        if self.has_trained():
            model.load_state_dict(self.context.state.array_records[MODEL_STATE].to_torch_state_dict())
        return model

    def has_trained(self) -> bool:
        """Whether the node holds a model of its own from an earlier round."""
        return MODEL_STATE in self.context.state.array_records

    def received_model(self, content: RecordDict) -> nn.Module:
        """This partition's architecture with the weights the message carries (FedAvg/FedProx)."""
        model = self.fresh_model()
        model.load_state_dict(content.array_records[protocol.ARRAYS].to_torch_state_dict())
        return model

    def initial_shared_model(self) -> nn.Module:
        """The shared architecture at its initialisation, from the run's seed: the same on
        every node and the server (the global model of round 0)."""
        return build_model(self.cfg.shared_model, self.data.splits.spec_for(self.cfg), self.cfg.seed,
                           private=self.cfg.private)

    def shared(self) -> tuple[nn.Module, ParamLayout, UpdateCodec]:
        """The shared model (global model, or FedKD's student) at version 0, built from
        the run's seed alike on every node and the server, with its layout and codec."""
        model = self.initial_shared_model()
        layout = ParamLayout.of(model.state_dict())
        return model, layout, update_codec(self.cfg, layout)

    def synced(
        self, msg: Message, model: nn.Module, layout: ParamLayout, codec: UpdateCodec
    ) -> tuple[np.ndarray, int]:
        """The shared model's ``[P]`` vector and version after the message's catch-up."""
        state = self.context.state
        held = None
        if GLOBAL_STATE in state.array_records and VERSION_STATE in state.config_records:
            held = (self.state_vector(GLOBAL_STATE, layout.size),
                    int(state.config_records[VERSION_STATE]["version"]))
        try:
            return sync.catch_up(msg.content, held, lambda: model_vector(model, layout), codec)
        except sync.SyncError as err:
            raise ConfigError(f"node {self.partition_id}: {err}") from None

    def state_vector(self, key: str, size: int) -> np.ndarray:
        """A float32 ``[size]`` vector kept in the node's state (zeros if absent)."""
        if key in self.context.state.array_records:
            return self.context.state.array_records[key]["values"].numpy()
        return np.zeros(size, np.float32)

    # --- training -----------------------------------------------------------------------
    def optim(self, lr: float) -> Optim:
        """SGD at ``lr`` x ``lr-decay`` ** (round - 1) with the run's momentum and weight
        decay."""
        decayed = lr * self.cfg.lr_decay ** max(self.server_round - 1, 0)
        return Optim(lr=decayed, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def train_stage1(self, model: nn.Module, proximal_mu: float = 0.0,
                     proximal_to: nn.Module | None = None, epochs: int | None = None) -> float:
        """``epochs`` (default ``local-epochs``) of cross-entropy on the private data, with
        the proximal term ``mu/2 ||w - w0||²`` toward ``proximal_to`` (default: the
        weights on entry) when ``proximal_mu`` > 0; the mean loss."""
        train = self.data.train
        return train_supervised(
            model, train.x, train.y, epochs=self.cfg.local_epochs if epochs is None else epochs,
            batch_size=self.cfg.batch_size, optim=self.optim(self.cfg.learning_rate),
            device=self.device, seed=self.seed, proximal_mu=proximal_mu, proximal_to=proximal_to,
            dp=self.privacy.training() if self.privacy else None, recalibrate=self.cfg.bn_recalibrate,
        )

    def reference_rows(self, key: str) -> np.ndarray:
        """Reference rows of the subset the instruction names under ``key`` (all rows when
        the run exchanges the whole reference set)."""
        subset = int(self.config.get(key, 0))
        return protocol.reference_subset(
            len(self.data.reference.y), self.cfg.reference_fraction, self.cfg.seed, subset
        )

    def transfer_rows(self, key: str) -> np.ndarray:
        """Transfer rows exchanged with the subset the instruction names under ``key``
        (none without a transfer set)."""
        transfer = self.data.transfer
        return protocol.transfer_window(0 if transfer is None else len(transfer.y), self.cfg.transfer_per_round,
                                        self.cfg.seed, int(self.config.get(key, 0)))

    def exchanged_inputs(self, key: str) -> np.ndarray:
        """``[M + T, *input]``: the inputs of the rows the instruction names under ``key``,
        the reference rows first, then the transfer rows (the wire's row order)."""
        return self._with_transfer(self.data.reference.x[self.reference_rows(key)], key)

    def _with_transfer(self, reference_inputs: np.ndarray, key: str) -> np.ndarray:
        if self.data.transfer is None:
            return reference_inputs
        return np.concatenate([reference_inputs, self.data.transfer.x[self.transfer_rows(key)]])

    def num_target_rows(self) -> int:
        """Rows this round's targets cover: :meth:`target_rows` and the transfer rows."""
        return len(self.target_rows()) + len(self.transfer_rows(protocol.TARGETS_SUBSET))

    def target_rows(self) -> np.ndarray:
        """Reference rows this round's targets cover: the targets' subset, less the rows
        the market held out (adaptive market; the draw the instruction names).

        Raises:
            ValueError: the run holds rows out but the instruction names no draw.
        """
        return protocol.distill_rows(self.reference_rows(protocol.TARGETS_SUBSET), self.held_out())

    def held_out(self) -> np.ndarray:
        """``[N_ref]`` bool: the rows the market scored when it computed this instruction's
        targets (none without targets or without held-out rows)."""
        num_reference = len(self.data.reference.y)
        if self.cfg.holdout <= 0 or not self.has_targets:
            return np.zeros(num_reference, dtype=bool)
        if protocol.TARGETS_HOLDOUT not in self.config:
            raise ValueError(f"the instruction carries targets but no '{protocol.TARGETS_HOLDOUT}' "
                             f"(the run holds out {self.cfg.holdout:g} of the reference rows)")
        return protocol.held_out_mask(num_reference, self.cfg.holdout,
                                      int(self.config[protocol.TARGETS_HOLDOUT]))

    def train_stage2(self, model: nn.Module, targets: np.ndarray) -> float:
        """``distill-epochs`` of KL toward ``targets`` (``[num_target_rows(), C]``) on the
        reference rows (and transfer rows), each batch paired with a private slice; the
        mean loss."""
        ref = self.data.reference
        rows = self.target_rows()
        return distill(
            model, self._with_transfer(ref.x[rows], protocol.TARGETS_SUBSET), targets,
            epochs=self.cfg.distill_epochs, batch_size=self.cfg.batch_size,
            optim=self.optim(self.cfg.distill_learning_rate), device=self.device, seed=self.seed + 1,
            temperature=self.cfg.temperature, kl_weight=self.cfg.distill_weight,
            y_ref=ref.y[rows], ce_weight=self.cfg.reference_ce_weight,
            private=(self.data.train.x, self.data.train.y), private_weight=self.cfg.private_ce_weight,
            max_grad_norm=self.cfg.distill_clip, augment=self._distill_augment(),
            dp=self.privacy.training() if self.privacy else None,
            private_rate=self.privacy.stage2_rate() if self.privacy else 0.0,
            row_weights=(label_mix_weights(targets, self.data.train.y, self._public_labels(), targets.shape[1])
                         if self.cfg.label_mix else None),
            recalibrate=self.cfg.bn_recalibrate,
        )

    def _public_labels(self) -> np.ndarray | None:
        """``[N_ref]`` the reference set's labels, or None where the run has none
        (``reference-labels = none``)."""
        return self.data.reference.y if self.cfg.labeled_reference else None

    def _distill_augment(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Stage 2's augmentation (``distill-augment``, images only): shifts by up to 1/8 of
        the side, and left-right flips where the labels survive them; else None."""
        if not self.cfg.distill_augment or self.data.splits.is_text:
            return None
        return shifts_and_flips(self.seed + 5, max(1, self.data.reference.x.shape[-1] // 8),
                                flip=self.cfg.dataset in MIRRORABLE_DATASETS)

    def samples_trained(self, distilled: bool) -> int:
        """Samples this round passed forward and backward (stage 1, and stage 2 when
        ``distilled``), see :func:`kta_flwr.task.training.training_samples`."""
        cfg = self.cfg
        return training_samples(
            len(self.data.train.y),
            len(self.reference_rows(protocol.TARGETS_SUBSET)) + len(self.transfer_rows(protocol.TARGETS_SUBSET)),
            local_epochs=cfg.local_epochs, distill_epochs=cfg.distill_epochs,
            batch_size=cfg.batch_size, private_weight=cfg.private_ce_weight, distilled=distilled,
        )

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Personalized and global accuracy and test loss of ``model``.

        Global: plain accuracy on the global test set. Personalized: the client's own
        writers' test rows where the data has writers, else the per-class accuracy
        re-weighted by the client's training label mix (``docs/method.md``).
        """
        test = self.data.test
        result = evaluate(model, test.x, test.y, self.data.label_distribution, self.device)
        personalized = result.personalized_accuracy
        local = self.data.local_test
        if local is not None:  # writer-partitioned data: the client's own writers' test rows
            personalized = evaluate(
                model, local.x, local.y, self.data.label_distribution, self.device
            ).accuracy
        return {
            "personalized-accuracy": personalized,
            "global-accuracy": result.accuracy,
            "test-loss": result.loss,
            "num-examples": len(test.y),
        }

    def keep(self, key: str, record: ArrayRecord | ConfigRecord) -> None:
        """Store ``record`` in the node's state under ``key``."""
        self.context.state[key] = record

    # --- checkpoints on disk --------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """This node's checkpoint of the run's strategy."""
        return checkpoint_file(self.model_folder, self.cfg.strategy)

    def _meta(self, architecture: str, counters: ConfigRecord) -> ModelMeta:
        spec = self.data.splits.spec_for(self.cfg)
        return ModelMeta(
            architecture=architecture, num_classes=spec.num_classes,
            input_shape=tuple(spec.input_shape), vocab_size=spec.vocab_size,
            finetune_layers=spec.finetune_layers, fingerprint=self.data.splits.reference_fingerprint,
            strategy=self.cfg.strategy, partition_id=self.partition_id, run_id=self.context.run_id,
            lineage=self.lineage, round=int(counters.get("round", 0)), private=self.cfg.private,
            rounds_trained=int(counters.get("rounds-trained", 0)),
            accuracies={k[4:]: float(v) for k, v in counters.items() if k.startswith("acc-")},
        )

    def record_evaluation(self, metrics: dict[str, float]) -> None:
        """Add this round's accuracies to the node's checkpoint (if it has trained)."""
        counters = self.context.state.config_records.get(META_STATE)
        if self.cfg.keeps_node_model and counters is not None and "round" in counters:
            self.save(trained=False, accuracies={
                k: v for k, v in metrics.items() if k.endswith("accuracy")})

    def save(self, trained: bool, accuracies: dict[str, float] | None = None) -> None:
        """Write what this node keeps (its own model, the compressed baselines' vectors and
        version) to :attr:`checkpoint_path`; ``trained``: after this round's training
        (advances the counters), else after its evaluation (records ``accuracies``)."""
        state = self.context.state
        counters = ConfigRecord(dict(state.config_records.get(META_STATE, ConfigRecord())))
        if trained:
            counters["round"] = self.server_round
            counters["rounds-trained"] = int(counters.get("rounds-trained", 0)) + 1
        for key, value in (accuracies or {}).items():
            counters[f"acc-{key}"] = float(value)
        state[META_STATE] = counters
        model = None
        if MODEL_STATE in state.array_records:
            model = state.array_records[MODEL_STATE].to_torch_state_dict()
        extra = {name: state.array_records[key]["values"].numpy()
                 for name, key in _EXTRA_VECTORS.items() if key in state.array_records}
        if VERSION_STATE in state.config_records:
            extra["version"] = np.asarray(int(state.config_records[VERSION_STATE]["version"]))
        architecture = self.cfg.model_for_partition(self.partition_id) if model else self.cfg.shared_model
        save_checkpoint(self.checkpoint_path, self._meta(architecture, counters), model, extra)
        if self.cfg.node_state == NODE_STATE_DISK:  # the next message restores it from disk
            for key in (MODEL_STATE, GLOBAL_STATE, VERSION_STATE, RESIDUAL_STATE, META_STATE):
                if key in state:
                    del state[key]

    def _restore(self) -> None:
        """Fill the empty node state from disk: the newest checkpoint of this run's lineage
        that is not ahead of :attr:`latest_round` (a restarted node, a resumed run), else
        with ``warm-start`` the node's last model of any run, checked against this run.

        A damaged file (unreadable, tensors that do not fit the architecture, NaN/inf) is
        passed over for the one before it (``.prev.pt``); that, and a fresh start in a
        resumed run, is logged here and told to the server in :attr:`notes` (the server
        logs it and counts it in the round's line).

        Raises:
            CheckpointError: ``warm-start`` found a model of another architecture, task or
                reference set (the field is named), or only damaged files.
        """
        saved, used, problems = self._lineage_checkpoint()
        if saved is None and self.cfg.warm_start:
            saved, used, damaged = self._warm_start_checkpoint()
            problems += damaged
            if saved is not None:  # a new run: only the client's own model carries over
                saved = SavedModel(saved.meta, saved.state, {})
        resumed = self.lineage != self.context.run_id
        if problems or (saved is None and resumed):
            reason = "; ".join(problems) if problems else (
                f"no checkpoint of run {self.lineage} at or before round {self.latest_round} "
                f"in {self.model_folder}")
            self.notes = {RESTORE_FILE: used.name if used else "none",
                          RESTORE_REASON: (reason if used else reason + "; starting fresh")[:MAX_NOTE]}
            log(WARNING, "partition %d: restored %s: %s", self.partition_id,
                self.notes[RESTORE_FILE], self.notes[RESTORE_REASON])
        if saved is None:
            return
        if self.cfg.node_state != NODE_STATE_DISK and not problems:
            log(INFO, "partition %d: restored %s (round %d)", self.partition_id, used, saved.meta.round)
        state = self.context.state
        if saved.state:
            state[MODEL_STATE] = ArrayRecord(saved.state)
        for name, key in _EXTRA_VECTORS.items():
            if name in saved.extra:
                state[key] = ArrayRecord({"values": Array(saved.extra[name].astype(np.float32))})
        if "version" in saved.extra:
            state[VERSION_STATE] = ConfigRecord({"version": int(saved.extra["version"])})
        meta = saved.meta
        state[META_STATE] = ConfigRecord({
            "round": meta.round, "rounds-trained": meta.rounds_trained,
            **{f"acc-{k}": v for k, v in meta.accuracies.items()},
        })

    def _check_fits(self, saved: SavedModel, path: Path) -> SavedModel:
        """``saved`` if its model fits this partition's architecture and its vectors the
        shared model.

        Raises:
            CheckpointError: a tensor or vector that does not fit, or NaN/inf (named).
        """
        if saved.state:
            check_tensors(self.fresh_model(), saved.state, path)
        vectors = [name for name in _EXTRA_VECTORS if name in saved.extra]
        if vectors:
            size = ParamLayout.of(self.initial_shared_model().state_dict()).size
            for name in vectors:
                if saved.extra[name].shape != (size,):
                    raise CheckpointError(f"checkpoint {path}: array '{name}' has shape "
                                          f"{list(saved.extra[name].shape)}, the shared model's is [{size}]")
        return saved

    def _candidates(self) -> list[Path]:
        """This strategy's checkpoint files, newest first."""
        return [checkpoint_file(self.model_folder, self.cfg.strategy, previous)
                for previous in (False, True)]

    def _first_usable(
        self, wanted: Callable[[SavedModel, Path], bool]
    ) -> tuple[SavedModel | None, Path | None, list[str]]:
        """The newest of this strategy's checkpoint files that reads, that ``wanted``
        accepts (it may raise to refuse the run) and that fits this node's models; its
        file; and what was wrong with the files passed over."""
        problems: list[str] = []
        for path in self._candidates():
            if not path.is_file():
                continue
            try:
                saved = read_checkpoint(path)
            except CheckpointError as err:
                problems.append(str(err))
                continue
            if not wanted(saved, path):  # outside the try: it may refuse the run
                continue
            try:
                return self._check_fits(saved, path), path, problems
            except CheckpointError as err:
                problems.append(str(err))
        return None, None, problems

    def _lineage_checkpoint(self) -> tuple[SavedModel | None, Path | None, list[str]]:
        """The newest usable checkpoint of this lineage not ahead of :attr:`latest_round`
        (:meth:`_first_usable`)."""
        return self._first_usable(lambda saved, path: saved.meta.lineage == self.lineage
                                  and saved.meta.round <= self.latest_round)

    def _warm_start_checkpoint(self) -> tuple[SavedModel | None, Path | None, list[str]]:
        """The newest usable checkpoint of any run (``warm-start``, :meth:`_first_usable`).

        Raises:
            CheckpointError: a model of another architecture, task or reference set, or
                no usable file where there are some.
        """
        mine = self._meta(self.cfg.model_for_partition(self.partition_id), ConfigRecord())
        expected = {k: getattr(mine, k) for k in WARM_START_FIELDS}

        def same_task(saved: SavedModel, path: Path) -> bool:
            check_meta(saved.meta, expected, path)  # another task: the run config is wrong
            return True

        found = self._first_usable(same_task)
        if found[0] is None and found[2]:
            raise CheckpointError("run-config 'warm-start': no usable checkpoint in "
                                  f"{self.model_folder}: " + "; ".join(found[2]))
        return found


#: ``train(node, msg, timer, metrics)`` -> the reply's records (the caller adds metrics).
TrainFn = Callable[[Node, Message, PhaseTimer, dict[str, float]], RecordDict]
#: ``evaluation_model(node, msg)`` -> the model this node evaluates.
EvaluationModelFn = Callable[[Node, Message], nn.Module]


@dataclass(frozen=True)
class FamilyHandler:
    """What the ClientApp does for one strategy family."""

    train: TrainFn
    evaluation_model: EvaluationModelFn
