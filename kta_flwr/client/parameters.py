"""The stock parameter family's client (FedAvg, FedProx): load the global weights from
the message, train on the private data (FedProx adds its proximal term, ``proximal-mu``
from the instruction), reply with the weights."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from kta_flwr.client.node import FamilyHandler, Node
from kta_flwr.flower.protocol import ARRAYS, STATIC_BATCH_NORM
from kta_flwr.flower.timing import PhaseTimer
from kta_flwr.task.training import recalibrate_batch_norm


def train(node: Node, msg: Message, timer: PhaseTimer, metrics: dict[str, float]) -> RecordDict:
    """Stage 1 from the received global model; the trained weights as ``"arrays"``."""
    with timer("restore"):
        model = node.received_model(msg.content)
    with timer("stage1"):
        mu = float(node.config.get("proximal-mu", 0.0))
        metrics["train-loss"] = node.train_stage1(model, proximal_mu=mu)
    content = RecordDict()
    with timer("save"):
        content[ARRAYS] = ArrayRecord(model.state_dict())
    metrics["samples"] = node.samples_trained(distilled=False)
    return content


def evaluation_model(node: Node, msg: Message) -> nn.Module:
    """The global model the evaluate message carries; with the instruction's
    ``static-batch-norm`` (HeteroFL), its BatchNorm statistics recomputed on the node's
    training inputs."""
    model = node.received_model(msg.content)
    if node.config.get(STATIC_BATCH_NORM, False):
        recalibrate_batch_norm(model, node.data.train.x, node.cfg.batch_size, node.device)
    return model


HANDLER = FamilyHandler(train=train, evaluation_model=evaluation_model)
