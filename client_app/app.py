"""The ClientApp: read the node and the message, dispatch to the strategy family's handler
(:mod:`kta_flwr.client`), reply.

What each family does in a round: ``docs/method.md``; the handlers' docstrings. Where the
node keeps its models and what happens on faults: ``docs/running.md``.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from kta_flwr.client import handler_for
from kta_flwr.client.attacks import poison_data, poison_reply
from kta_flwr.client.faults import inject_faults
from kta_flwr.client.node import Node, partition_id_of
from kta_flwr.client.privacy import EVALUATE, TRAIN
from kta_flwr.flower import protocol
from kta_flwr.flower.timing import PhaseTimer

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local work; replies with reference logits (market), weights
    (FedAvg/FedProx) or a compressed update (fedavg-topk, sapef, fedkd).

    Besides the losses, the reply's metrics carry ``samples`` (samples trained on) and the
    wall seconds of each phase (``t-setup``, ``t-restore``, ``t-stage1``, ``t-stage2``,
    ``t-predict``, ``t-save``; :mod:`kta_flwr.flower.timing`) and, under DP, the ε the
    node has spent (``dp-epsilon``, ``logit-epsilon``; :mod:`kta_flwr.client.privacy`).
    A node that passed over a damaged checkpoint, or started fresh in a resumed run, says
    so in a ``notes`` record (:attr:`kta_flwr.client.node.Node.notes`).
    """
    timer = PhaseTimer()
    with timer("setup"):  # config, data (cached per process), device, state from disk
        node = Node(msg, context)
    inject_faults(node)
    poison_data(node)
    metrics: dict[str, float] = {"num-examples": len(node.data.train.y),
                                 protocol.PARTITION_ID: node.partition_id}
    content = handler_for(node.cfg).train(node, msg, timer, metrics)
    if node.privacy:  # under DP: the ledger, and the epsilon spent so far
        node.privacy.settle(node.server_round, TRAIN, metrics)
    poison_reply(node, msg, content, metrics)
    content[protocol.METRICS] = MetricRecord({**metrics, **timer.metrics()})
    if node.notes:  # a damaged checkpoint passed over, or a fresh start in a resumed run
        content[protocol.NOTES] = ConfigRecord(node.notes)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the model the family evaluates: the personalized model (market, FedKD's
    teacher) or the global model the message carries; the node's checkpoint records the
    accuracies."""
    timer = PhaseTimer()
    with timer("setup"):
        node = Node(msg, context)
    with timer("restore"):
        model = handler_for(node.cfg).evaluation_model(node, msg)
        if node.privacy:  # fedavg-ft's fine-tuning under DP
            node.privacy.settle(node.server_round, EVALUATE)
    with timer("evaluate"):
        metrics = node.evaluate(model)
    with timer("save"):
        node.record_evaluation(metrics)
    metrics = {**metrics, protocol.PARTITION_ID: node.partition_id, **timer.metrics()}
    content = RecordDict({protocol.METRICS: MetricRecord(metrics)})
    if node.notes:
        content[protocol.NOTES] = ConfigRecord(node.notes)
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds (a resumed run maps the new node ids with it)."""
    metrics = MetricRecord({protocol.PARTITION_ID: partition_id_of(context)})
    return Message(content=RecordDict({protocol.METRICS: metrics}), reply_to=msg)
