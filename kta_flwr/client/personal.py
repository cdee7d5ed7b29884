"""The personalization family's client (fedavg-ft, ditto, fedrep): the server runs Flower's
FedAvg on the shared weights; each node keeps a personal model in ``context.state`` and
its folder on disk (as a market client does) and is evaluated on it.

- ``fedavg-ft``, FedAvg then local fine-tuning (Wang et al., 2019, "Federated Evaluation
  of On-device Personalization", arXiv:1910.10252; Yu et al., 2020, "Salvaging Federated
  Learning by Local Adaptation", arXiv:2002.04758): trains exactly as FedAvg; to
  evaluate, the node fine-tunes the received global model for ``finetune-epochs`` on its
  private data and keeps the result as its personal model. 0 epochs is FedAvg's evaluation.
- ``ditto`` (Li, Hu, Beirami and Smith, ICML 2021, "Ditto: Fair and Robust Federated
  Learning Through Personalization", Algorithm 1): the received global model ``w`` trains
  as under FedAvg and goes back; the personal model ``v`` trains on the same data with
  ``ditto-lambda/2 ||v - w||²`` toward the received ``w``. ``v`` starts from the node's
  own initialisation (``local``'s), so λ = 0 is local training.
- ``fedrep`` (Collins, Hassani, Mokhtari and Shakkottai, ICML 2021, "Exploiting Shared
  Representations for Personalized Federated Learning", Algorithm 1): the node's model is
  the received body with its own head (:func:`kta_flwr.task.models.head_keys`, the last
  linear layer); ``head-epochs`` train the head with the body fixed, then
  ``local-epochs`` the body with the head fixed; only the body goes back. Every head
  starts from the global model's initialisation, as in the authors' code.

All three reply like FedAvg (``"arrays"`` and the same metrics), so Flower's FedAvg and the
boundary checks aggregate them unchanged; the personal-model training time is part of
``t-stage1`` (train) or ``t-restore`` (fedavg-ft's evaluation).
"""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from kta_flwr.client.node import MODEL_STATE, FamilyHandler, Node
from kta_flwr.config import ConfigError
from kta_flwr.flower.protocol import ARRAYS
from kta_flwr.flower.timing import PhaseTimer
from kta_flwr.task.models import head_keys


def shared_state(node: Node, model: nn.Module) -> OrderedDict:
    """What of ``model`` crosses the wire: its body under FedRep, else every tensor."""
    state = model.state_dict()
    if not node.cfg.shares_body_only:
        return state
    head = head_keys(model)
    return OrderedDict((key, value) for key, value in state.items() if key not in head)


def with_received(node: Node, content: RecordDict) -> nn.Module:
    """The node's personal model (its state, else the global model's initialisation)
    with the message's shared weights loaded: the whole model, or FedRep's body.

    Every head starts from the global initialisation, as in the FedRep authors' code
    (each user's weights are copied from the global network), so the bodies the server
    averages were all fitted to heads that started alike.

    Raises:
        ConfigError: the message's arrays are not this model's shared part.
    """
    model = node.personal_model() if node.has_trained() else node.initial_shared_model()
    received = content.array_records[ARRAYS].to_torch_state_dict()
    expected = shared_state(node, model)
    if list(received) != list(expected):
        raise ConfigError(
            f"node {node.partition_id}: the server sent arrays {list(received)[:3]}..., "
            f"this node's {node.cfg.strategy} model shares {list(expected)[:3]}...: "
            "check 'models' and 'strategy'")
    model.load_state_dict(received, strict=not node.cfg.shares_body_only)
    return model


def _train_only(model: nn.Module, keys: frozenset[str], trainable: set[str]) -> None:
    """Let only the parameters named in ``keys`` train (of those ``trainable`` at all)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in keys and name in trainable)


def train(node: Node, msg: Message, timer: PhaseTimer, metrics: dict[str, float]) -> RecordDict:
    """One round: the shared model trains and goes back as ``"arrays"``; Ditto and FedRep
    also train and keep the personal model."""
    cfg = node.cfg
    personal = None
    epochs = cfg.local_epochs
    with timer("restore"):
        if cfg.shares_body_only:
            shared = personal = with_received(node, msg.content)
        else:
            shared = node.received_model(msg.content)
    with timer("stage1"):
        if cfg.strategy == "fedrep":
            metrics["train-loss"] = _fedrep_round(node, personal)
            epochs += cfg.head_epochs
        else:
            if cfg.strategy == "ditto":
                personal = node.personal_model()
                node.train_stage1(personal, proximal_mu=cfg.ditto_lambda,
                                  proximal_to=node.received_model(msg.content))
                epochs *= 2
            metrics["train-loss"] = node.train_stage1(shared)
    content = RecordDict()
    with timer("save"):
        content[ARRAYS] = ArrayRecord(shared_state(node, shared))
        if personal is not None:
            node.keep(MODEL_STATE, ArrayRecord(personal.state_dict()))
            node.save(trained=True)
    metrics["samples"] = len(node.data.train.y) * epochs
    return content


def _fedrep_round(node: Node, model: nn.Module) -> float:
    """``head-epochs`` on the head (body fixed), then ``local-epochs`` on the body (head
    fixed); the body's mean loss. Parameters frozen by the model itself stay frozen."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = head_keys(model)
    _train_only(model, head, trainable)
    node.train_stage1(model, epochs=node.cfg.head_epochs)
    _train_only(model, frozenset(trainable - head), trainable)
    loss = node.train_stage1(model)
    _train_only(model, frozenset(trainable), trainable)
    return loss


def evaluation_model(node: Node, msg: Message) -> nn.Module:
    """The node's personal model: the fine-tuned global model (fedavg-ft), Ditto's
    personal model, or FedRep's received body with the node's head."""
    cfg = node.cfg
    if cfg.strategy == "ditto":
        return node.personal_model()
    if cfg.strategy == "fedrep":
        return with_received(node, msg.content)
    model = node.received_model(msg.content)
    if cfg.finetune_epochs > 0:
        node.train_stage1(model, epochs=cfg.finetune_epochs)
        node.keep(MODEL_STATE, ArrayRecord(model.state_dict()))
        node.save(trained=True)
    return model


HANDLER = FamilyHandler(train=train, evaluation_model=evaluation_model)
