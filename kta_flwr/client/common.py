"""The ``fedavg-common`` client: a member of the fleet's common architecture is a FedAvg
client (:mod:`.parameters`: the message carries the global model); any other node trains
its own model alone, as under ``local`` (:mod:`.market`: the message carries no model).
"""

from __future__ import annotations

from flwr.app import Message, RecordDict
from torch import nn

from kta_flwr.client import market, parameters
from kta_flwr.client.node import FamilyHandler, Node
from kta_flwr.flower.protocol import ARRAYS
from kta_flwr.flower.timing import PhaseTimer


def train(node: Node, msg: Message, timer: PhaseTimer, metrics: dict[str, float]) -> RecordDict:
    """FedAvg's round for a member, a local round for the others."""
    member = ARRAYS in msg.content.array_records
    return (parameters.train if member else market.train)(node, msg, timer, metrics)


def evaluation_model(node: Node, msg: Message) -> nn.Module:
    """A member: the global model the message carries; the others: their own model."""
    if ARRAYS in msg.content.array_records:
        return parameters.evaluation_model(node, msg)
    return market.evaluation_model(node, msg)


HANDLER = FamilyHandler(train=train, evaluation_model=evaluation_model)
