"""FedProto's client: train the node's own model toward the global class prototypes, reply
with its own prototypes (:mod:`kta_flwr.flower.strategies.prototypes`).

Round ``r``: restore the model; ``local-epochs`` of cross-entropy plus ``prototype-weight``
times the squared distance of each embedding (the classifier's input, projected to
``prototype-dim`` where its size differs) to its class's global prototype, when the
instruction carries prototypes; then the mean embedding of each class the node holds, in
eval mode after training, goes up. The model never leaves the node.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from kta_flwr.client.node import MODEL_STATE, FamilyHandler, Node
from kta_flwr.flower.strategies.prototypes import PROTOTYPES, prototype_record, read_prototypes
from kta_flwr.flower.timing import PhaseTimer
from kta_flwr.maths.prototypes import class_prototypes
from kta_flwr.task.models import classifier_of
from kta_flwr.task.training import embedding_projection, embeddings, train_with_prototypes


def train(node: Node, msg: Message, timer: PhaseTimer, metrics: dict[str, float]) -> RecordDict:
    """Stage 1 with the prototype term; the node's prototypes under ``"prototypes"``."""
    cfg, data = node.cfg, node.data
    num_classes = data.splits.num_classes
    with timer("restore"):
        model = node.personal_model()
        projection = embedding_projection(classifier_of(model).in_features, cfg.prototype_dim, cfg.seed)
        prototypes = classes = None
        if PROTOTYPES in msg.content.array_records:
            prototypes, classes = read_prototypes(msg.content.array_records[PROTOTYPES], num_classes,
                                                  cfg.prototype_dim)
    with timer("stage1"):
        metrics["train-loss"] = train_with_prototypes(
            model, data.train.x, data.train.y, num_classes=num_classes, prototypes=prototypes, classes=classes,
            weight=cfg.prototype_weight, projection=projection, epochs=cfg.local_epochs,
            batch_size=cfg.batch_size, optim=node.optim(cfg.learning_rate), device=node.device,
            seed=node.seed, recalibrate=cfg.bn_recalibrate,
        )
    with timer("predict"):
        values, held = class_prototypes(embeddings(model, data.train.x, node.device, projection),
                                        data.train.y, num_classes)
    with timer("save"):
        node.keep(MODEL_STATE, ArrayRecord(model.state_dict()))
        node.save(trained=True)
    metrics["samples"] = node.samples_trained(distilled=False)
    return RecordDict({PROTOTYPES: prototype_record(values, held)})


def evaluation_model(node: Node, msg: Message) -> nn.Module:
    """The node's own model."""
    del msg
    return node.personal_model()


HANDLER = FamilyHandler(train=train, evaluation_model=evaluation_model)
