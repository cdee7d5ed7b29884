"""The market family's client (kta, fedmd, ktpfl, local): two-stage training of the
client's own model; only reference-set logits leave the node.

Round ``r`` of a market client:

1. restore the client's own model from ``context.state`` (it never leaves the node); a
   newcomer with nothing to restore starts from the server's global model when its first
   instruction carries one (``newcomer-start = "global"``);
2. **stage 1**: ``local-epochs`` of cross-entropy on the private partition;
3. **stage 2** (when this round's instruction carries targets, computed by the server from
   earlier logits; not in a client's first round, nor when the market's gate kept them
   back): ``distill-epochs`` of KL toward the personalized targets on the reference
   set, each reference batch paired with a private slice (``private-ce-weight``), so the
   step descends the whole market objective (``docs/method.md``);
4. save the model to ``context.state`` and to the node's folder on disk; reply with its
   logits on the reference set (``local``: metrics only), with ``logit-noise``
   clipped and noised (:mod:`kta_flwr.maths.noisy_logits`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from kta_flwr.client.node import MODEL_STATE, FamilyHandler, Node
from kta_flwr.factory import knowledge_codec
from kta_flwr.flower import protocol
from kta_flwr.flower.timing import PhaseTimer
from kta_flwr.maths.noisy_logits import noisy_logits
from kta_flwr.task.training import predict_logits


def train(node: Node, msg: Message, timer: PhaseTimer, metrics: dict[str, float]) -> RecordDict:
    """Stage 1, stage 2 toward the message's targets (if any), the reference logits."""
    cfg, data = node.cfg, node.data
    codec = knowledge_codec(cfg)
    content = RecordDict()
    targets = None
    with timer("restore"):
        model = node.personal_model()
        if protocol.START_MODEL in msg.content.array_records and not node.has_trained():
            # a newcomer: the server's global model to start from (newcomer-start = global)
            model.load_state_dict(msg.content.array_records[protocol.START_MODEL].to_torch_state_dict())
        if protocol.TARGETS in msg.content.array_records:
            targets = protocol.unpack(
                msg.content, protocol.TARGETS, node.num_target_rows(), data.splits.num_classes, codec
            )
    with timer("stage1"):
        metrics["train-loss"] = node.train_stage1(model)
    if targets is not None:
        with timer("stage2"):
            metrics["distill-loss"] = node.train_stage2(model, targets)
    if cfg.exchanges_knowledge:
        with timer("predict"):
            logits = predict_logits(model, node.exchanged_inputs(protocol.LOGITS_SUBSET), node.device)
            if cfg.logit_noise > 0:
                logits = noisy_logits(logits, cfg.logit_noise, cfg.logit_clip,
                                      np.random.default_rng([node.seed, 2]))
            content[protocol.LOGITS] = protocol.pack(logits, codec)
    with timer("save"):
        node.keep(MODEL_STATE, ArrayRecord(model.state_dict()))
        node.save(trained=True)
    metrics["samples"] = node.samples_trained(distilled=targets is not None)
    return content


def evaluation_model(node: Node, msg: Message) -> nn.Module:
    """The client's own model (no arrays are sent for evaluation)."""
    del msg
    return node.personal_model()


HANDLER = FamilyHandler(train=train, evaluation_model=evaluation_model)
