"""The ClientApp: two-stage training for the market, plain local training for FedAvg/FedProx.

Order within round ``r`` of a market client (kta, fedmd):

1. restore the client's own model from ``context.state`` (it never leaves the node);
2. **stage 1**: ``local-epochs`` of cross-entropy on the private partition;
3. **stage 2**: ``distill-epochs`` over the reference set of KL toward the personalized
   targets carried by this round's instruction (computed by the server from the logits of
   round ``r-1``; a client's first round has none, nor a round in which the market
   kept them back, and then it skips stage 2), each reference
   batch paired with a slice of the private data (one pass per epoch) whose cross-entropy
   is added with weight ``private-ce-weight`` (the block-coordinate step on the whole
   market objective, so distillation does not overwrite what the client learnt privately);
4. save the model to ``context.state``; reply with its logits on the reference set.

``local`` runs step 2 only and replies with metrics. FedAvg/FedProx load the global
weights from the message, run step 2 (FedProx adds its proximal term) and reply with
weights. The compressed-update baselines (``fedavg-topk``, ``sapef``, ``fedkd``) bring
their stored copy of the shared model up to date from the message (:mod:`kta_flwr.sync`),
train, and reply with a compressed update (:func:`_train_compressed`). Evaluation replies
carry metrics only.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from kta_flwr import protocol, sync
from kta_flwr.compression import ParamLayout, UpdateCodec, error_feedback, sapef_start, sapef_vector
from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.data import ClientData, load_client_data
from kta_flwr.models import build_model
from kta_flwr.training import (
    Optim,
    distill,
    evaluate,
    load_vector,
    model_vector,
    mutual_distill,
    predict_logits,
    resolve_device,
    train_supervised,
    training_samples,
)
from kta_flwr.timing import PhaseTimer

MODEL_STATE = "personal-model"
GLOBAL_STATE = "global-model"  # compressed strategies: this node's copy of the shared model
VERSION_STATE = "global-version"
RESIDUAL_STATE = "residual"  # error feedback

app = ClientApp()


class _Node:
    """Everything one handler call needs, read from the Context and the Message."""

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

    def fresh_model(self) -> nn.Module:
        splits = self.data.splits
        name = self.cfg.model_for_partition(self.partition_id)
        # FedAvg/FedProx overwrite these weights with the global model.
        return build_model(name, splits.spec_for(self.cfg), self.cfg.seed + self.partition_id)

    def shared(self) -> tuple[nn.Module, ParamLayout, UpdateCodec]:
        """The shared model (global model, or FedKD's student) at version 0, built from
        the run's seed alike on every node and the server, with its layout and codec."""
        model = build_model(self.cfg.shared_model, self.data.splits.spec_for(self.cfg), self.cfg.seed)
        layout = ParamLayout.of(model.state_dict())
        return model, layout, self.cfg.update_codec(layout)

    def synced(
        self, msg: Message, model: nn.Module, layout: ParamLayout, codec: UpdateCodec
    ) -> tuple[np.ndarray, int]:
        """The shared model's ``[P]`` vector and version after the message's catch-up."""
        state = self.context.state
        held = None
        if GLOBAL_STATE in state.array_records and VERSION_STATE in state.config_records:
            held = (_state_vector(self.context, GLOBAL_STATE, layout.size),
                    int(state.config_records[VERSION_STATE]["version"]))
        try:
            return sync.catch_up(msg.content, held, lambda: model_vector(model, layout), codec)
        except sync.SyncError as err:
            raise ConfigError(f"node {self.partition_id}: {err}") from None

    def personal_model(self) -> nn.Module:
        """The client's own model, restored from the node's state if it trained before."""
        model = self.fresh_model()
        if MODEL_STATE in self.context.state.array_records:
            model.load_state_dict(self.context.state.array_records[MODEL_STATE].to_torch_state_dict())
        return model

    def optim(self, lr: float) -> Optim:
        cfg = self.cfg
        return Optim(lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def train_stage1(self, model: nn.Module, proximal_mu: float = 0.0) -> float:
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local work; replies with reference logits (market), weights
    (FedAvg/FedProx) or a compressed update (fedavg-topk, sapef, fedkd).

    Besides the losses, the reply's metrics carry ``samples`` (samples trained on, see
    :func:`kta_flwr.training.training_samples`) and the wall seconds of each phase
    (``t-setup``, ``t-restore``, ``t-stage1``, ``t-stage2``, ``t-predict``, ``t-save``).
    """
    timer = PhaseTimer()
    with timer("setup"):  # config, data (cached per process), device
        node = _Node(msg, context)
    cfg, data = node.cfg, node.data
    metrics: dict[str, float] = {"num-examples": len(data.train.y), "partition-id": node.partition_id}
    if cfg.is_compressed:
        content = _train_compressed(node, msg, timer, metrics)
    else:
        content = _train_market_or_stock(node, msg, timer, metrics)
    content[protocol.METRICS] = MetricRecord({**metrics, **timer.metrics()})
    return Message(content=content, reply_to=msg)


def _train_market_or_stock(
    node: _Node, msg: Message, timer: PhaseTimer, metrics: dict[str, float]
) -> RecordDict:
    """Market (stage 1, stage 2 toward the targets, logits) or FedAvg/FedProx (weights)."""
    cfg, data, context = node.cfg, node.data, node.context
    content = RecordDict()
    targets = None
    with timer("restore"):
        if cfg.is_market:
            model = node.personal_model()
            if protocol.TARGETS in msg.content.array_records:
                targets = protocol.unpack(
                    msg.content, protocol.TARGETS, len(node.target_rows()), data.splits.num_classes,
                    cfg.knowledge_codec(),
                )
        else:
            model = node.fresh_model()
            model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    with timer("stage1"):
        mu = 0.0 if cfg.is_market else float(node.config.get("proximal-mu", 0.0))
        metrics["train-loss"] = node.train_stage1(model, proximal_mu=mu)
    if targets is not None:
        with timer("stage2"):
            metrics["distill-loss"] = node.train_stage2(model, targets)
    if cfg.is_market and cfg.strategy != "local":
        with timer("predict"):
            rows = node.reference_rows(protocol.LOGITS_SUBSET)
            content[protocol.LOGITS] = protocol.pack(
                predict_logits(model, data.reference.x[rows], node.device), cfg.knowledge_codec()
            )
    with timer("save"):
        if cfg.is_market:
            context.state[MODEL_STATE] = ArrayRecord(model.state_dict())
        else:
            content["arrays"] = ArrayRecord(model.state_dict())
    metrics["samples"] = training_samples(
        len(data.train.y), len(node.reference_rows(protocol.TARGETS_SUBSET)),
        local_epochs=cfg.local_epochs,
        distill_epochs=cfg.distill_epochs, batch_size=cfg.batch_size,
        private_weight=cfg.private_ce_weight, distilled=targets is not None,
    )
    return content


def _train_compressed(
    node: _Node, msg: Message, timer: PhaseTimer, metrics: dict[str, float]
) -> RecordDict:
    """Catch up with the global (or student) model, train, reply with the compressed
    update: Top-k with error feedback / SA-PEF (the residual stays in the node's state),
    or FedKD's SVD-compressed student update after mutual distillation with the private
    teacher."""
    cfg, data, context = node.cfg, node.data, node.context
    with timer("restore"):
        shared, layout, codec = node.shared()
        vector, version = node.synced(msg, shared, layout, codec)
        residual = _state_vector(context, RESIDUAL_STATE, layout.size)
    with timer("stage1"):
        if cfg.strategy == "fedkd":
            teacher = node.personal_model()
            load_vector(shared, layout, vector)
            train = data.train
            metrics["train-loss"] = mutual_distill(
                teacher, shared, train.x, train.y, epochs=cfg.local_epochs,
                batch_size=cfg.batch_size, optim=node.optim(cfg.learning_rate),
                device=node.device, seed=node.seed,
            )
            payload = codec.compress(model_vector(shared, layout) - vector, node.server_round)
        else:
            alpha = cfg.step_ahead
            load_vector(shared, layout, sapef_start(vector, residual, alpha))
            metrics["train-loss"] = node.train_stage1(shared)
            sent = sapef_vector(model_vector(shared, layout), vector, residual, alpha)
            payload, residual = error_feedback(sent, codec.k)
            metrics["residual-norm"] = float(np.linalg.norm(residual))
    with timer("save"):
        context.state[GLOBAL_STATE] = ArrayRecord({"values": Array(vector)})
        context.state[VERSION_STATE] = ConfigRecord({"version": version})
        if cfg.strategy == "fedkd":
            context.state[MODEL_STATE] = ArrayRecord(teacher.state_dict())
        else:
            context.state[RESIDUAL_STATE] = ArrayRecord({"values": Array(residual)})
    metrics["samples"] = training_samples(
        len(data.train.y), 0, local_epochs=cfg.local_epochs, distill_epochs=0,
        batch_size=cfg.batch_size, private_weight=0.0, distilled=False,
    )
    return RecordDict({sync.UPDATE: sync.to_record(payload)})


def _state_vector(context: Context, key: str, size: int) -> np.ndarray:
    """A float32 ``[size]`` vector kept in the node's state (zeros if absent)."""
    if key in context.state.array_records:
        return context.state.array_records[key]["values"].numpy()
    return np.zeros(size, np.float32)


@app.evaluate()
def evaluate_model(msg: Message, context: Context) -> Message:
    """Evaluate the personalized model (market) or the received global model."""
    timer = PhaseTimer()
    with timer("setup"):
        node = _Node(msg, context)
    with timer("restore"):
        if node.cfg.is_market or node.cfg.strategy == "fedkd":
            model = node.personal_model()
        elif node.cfg.is_compressed:  # the current global model, not kept
            model, layout, codec = node.shared()
            load_vector(model, layout, node.synced(msg, model, layout, codec)[0])
        else:
            model = node.fresh_model()
            model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    with timer("evaluate"):
        test = node.data.test
        result = evaluate(model, test.x, test.y, node.data.label_distribution, node.device)
        personalized = result.personalized_accuracy
        local = node.data.local_test
        if local is not None:  # writer-partitioned data: the client's own writers' test rows
            personalized = evaluate(
                model, local.x, local.y, node.data.label_distribution, node.device
            ).accuracy
    metrics = MetricRecord(
        {
            "personalized-accuracy": personalized,
            "global-accuracy": result.accuracy,
            "test-loss": result.loss,
            "num-examples": len(test.y),
            "partition-id": node.partition_id,
            **timer.metrics(),
        }
    )
    return Message(content=RecordDict({protocol.METRICS: metrics}), reply_to=msg)
