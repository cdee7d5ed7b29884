"""The compressed-update family's client (fedavg-topk, sapef, fedkd).

The node brings its stored copy of the shared model (the global model, or FedKD's
student) up to date from the message (:mod:`kta_flwr.flower.sync`), trains, and replies
with a compressed update: Top-k with error feedback or SA-PEF (the residual stays in the
node's state), or FedKD's SVD-compressed student update after mutual distillation with
its private teacher (:mod:`kta_flwr.maths.update_compression`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from torch import nn

from kta_flwr.client.node import (
    GLOBAL_STATE,
    MODEL_STATE,
    RESIDUAL_STATE,
    VERSION_STATE,
    FamilyHandler,
    Node,
)
from kta_flwr.flower import sync
from kta_flwr.flower.timing import PhaseTimer
from kta_flwr.maths.update_compression import error_feedback, sapef_start, sapef_vector
from kta_flwr.task.training import load_vector, model_vector, mutual_distill


def train(node: Node, msg: Message, timer: PhaseTimer, metrics: dict[str, float]) -> RecordDict:
    """Catch up, train, reply with the compressed update under ``"update"``."""
    cfg, data = node.cfg, node.data
    with timer("restore"):
        shared, layout, codec = node.shared()
        vector, version = node.synced(msg, shared, layout, codec)
        residual = node.state_vector(RESIDUAL_STATE, layout.size)
    with timer("stage1"):
        if cfg.has_private_teacher:
            teacher = node.personal_model()
            load_vector(shared, layout, vector)
            metrics["train-loss"] = mutual_distill(
                teacher, shared, data.train.x, data.train.y, epochs=cfg.local_epochs,
                batch_size=cfg.batch_size, optim=node.optim(cfg.learning_rate),
                device=node.device, seed=node.seed, recalibrate=cfg.bn_recalibrate,
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
        node.keep(GLOBAL_STATE, ArrayRecord({"values": Array(vector)}))
        node.keep(VERSION_STATE, ConfigRecord({"version": version}))
        if cfg.has_private_teacher:
            node.keep(MODEL_STATE, ArrayRecord(teacher.state_dict()))
        else:
            node.keep(RESIDUAL_STATE, ArrayRecord({"values": Array(residual)}))
        node.save(trained=True)
    metrics["samples"] = node.samples_trained(distilled=False)
    return RecordDict({sync.UPDATE: sync.to_record(payload)})


def evaluation_model(node: Node, msg: Message) -> nn.Module:
    """FedKD: the private teacher. Top-k/SA-PEF: the current global model (its catch-up
    is in the message; the node does not keep it)."""
    if node.cfg.has_private_teacher:
        return node.personal_model()
    model, layout, codec = node.shared()
    return load_vector(model, layout, node.synced(msg, model, layout, codec)[0])

HANDLER = FamilyHandler(train=train, evaluation_model=evaluation_model)
