"""One node's view of one message: its run config, data, device, seeds and state.

A :class:`Node` is built per ClientApp call (data is cached per process by
:mod:`kta_flwr.task.splits`). Models live in the node's ``context.state`` under the keys
below; they never leave the node except as the family's reply says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.factory import update_codec
from kta_flwr.flower import protocol, sync
from kta_flwr.flower.timing import PhaseTimer
from kta_flwr.maths.update_compression import ParamLayout, UpdateCodec
from kta_flwr.task.models import build_model
from kta_flwr.task.splits import ClientData, load_client_data
from kta_flwr.task.training import (
    Optim,
    distill,
    evaluate,
    model_vector,
    resolve_device,
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


class Node:  # pylint: disable=too-many-instance-attributes
    """Everything one handler call needs, read from the Context and the Message.

    Raises:
        ConfigError: a bad run config, a node config without ``partition-id`` and
            ``num-partitions``, or a reference set that differs from the server's.
    """

    def __init__(self, msg: Message, context: Context) -> None:
        self.cfg: RunConfig = parse_run_config(context.run_config)
        node = context.node_config
        if "partition-id" not in node or "num-partitions" not in node:
            raise ConfigError(
                "node-config needs 'partition-id' and 'num-partitions' (e.g. "
                "flower-supernode --node-config 'partition-id=0 num-partitions=2')"
            )
        self.partition_id = int(node["partition-id"])
        self.data: ClientData = load_client_data(
            self.cfg, self.partition_id, int(node["num-partitions"])
        )
        self.config: ConfigRecord = msg.content.config_records.get(protocol.CONFIG, ConfigRecord())
        self.server_round = int(self.config.get("server-round", 0))
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

    # --- models -------------------------------------------------------------------------
    def fresh_model(self) -> nn.Module:
        """This partition's architecture, initialised from the run's seed and partition."""
        name = self.cfg.model_for_partition(self.partition_id)
        return build_model(name, self.data.splits.spec_for(self.cfg), self.cfg.seed + self.partition_id)

    def personal_model(self) -> nn.Module:
        """The client's own model, restored from the node's state if it trained before."""
        model = self.fresh_model()
        if MODEL_STATE in self.context.state.array_records:
            model.load_state_dict(self.context.state.array_records[MODEL_STATE].to_torch_state_dict())
        return model

    def received_model(self, content: RecordDict) -> nn.Module:
        """This partition's architecture with the weights the message carries (FedAvg/FedProx)."""
        model = self.fresh_model()
        model.load_state_dict(content.array_records["arrays"].to_torch_state_dict())
        return model

    def shared(self) -> tuple[nn.Module, ParamLayout, UpdateCodec]:
        """The shared model (global model, or FedKD's student) at version 0, built from
        the run's seed alike on every node and the server, with its layout and codec."""
        model = build_model(self.cfg.shared_model, self.data.splits.spec_for(self.cfg), self.cfg.seed)
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
        """SGD at ``lr`` with the run's momentum and weight decay."""
        return Optim(lr=lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def train_stage1(self, model: nn.Module, proximal_mu: float = 0.0) -> float:
        """``local-epochs`` of cross-entropy on the private data; the mean loss."""
        train = self.data.train
        return train_supervised(
            model, train.x, train.y, epochs=self.cfg.local_epochs, batch_size=self.cfg.batch_size,
            optim=self.optim(self.cfg.learning_rate), device=self.device, seed=self.seed, proximal_mu=proximal_mu,
        )

    def reference_rows(self, key: str) -> np.ndarray:
        """Reference rows of the subset the instruction names under ``key`` (all rows when
        the run exchanges the whole reference set)."""
        subset = int(self.config.get(key, 0))
        return protocol.reference_subset(
            len(self.data.reference.y), self.cfg.reference_fraction, self.cfg.seed, subset
        )

    def target_rows(self) -> np.ndarray:
        """Reference rows this round's targets cover: the targets' subset, held-out rows
        (adaptive market) left out."""
        held_out = protocol.held_out_mask(len(self.data.reference.y), self.cfg.holdout, self.cfg.seed)
        return protocol.distill_rows(self.reference_rows(protocol.TARGETS_SUBSET), held_out)

    def train_stage2(self, model: nn.Module, targets: np.ndarray) -> float:
        """``distill-epochs`` of KL toward ``targets`` (``[len(target_rows()), C]``) on the
        reference rows, each batch paired with a private slice; the mean loss."""
        ref = self.data.reference
        rows = self.target_rows()
        return distill(
            model, ref.x[rows], targets, epochs=self.cfg.distill_epochs, batch_size=self.cfg.batch_size,
            optim=self.optim(self.cfg.distill_learning_rate), device=self.device, seed=self.seed + 1,
            temperature=self.cfg.temperature, kl_weight=self.cfg.distill_weight,
            y_ref=ref.y[rows], ce_weight=self.cfg.reference_ce_weight,
            private=(self.data.train.x, self.data.train.y), private_weight=self.cfg.private_ce_weight,
            max_grad_norm=self.cfg.distill_clip,
        )

    def samples_trained(self, distilled: bool) -> int:
        """Samples this round passed forward and backward (stage 1, and stage 2 when
        ``distilled``), see :func:`kta_flwr.task.training.training_samples`."""
        cfg = self.cfg
        return training_samples(
            len(self.data.train.y), len(self.reference_rows(protocol.TARGETS_SUBSET)),
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


#: ``train(node, msg, timer, metrics)`` -> the reply's records (the caller adds metrics).
TrainFn = Callable[[Node, Message, PhaseTimer, dict[str, float]], RecordDict]
#: ``evaluation_model(node, msg)`` -> the model this node evaluates.
EvaluationModelFn = Callable[[Node, Message], nn.Module]


@dataclass(frozen=True)
class FamilyHandler:
    """What the ClientApp does for one strategy family."""

    train: TrainFn
    evaluation_model: EvaluationModelFn
