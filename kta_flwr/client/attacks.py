"""Attacks, for research (run-config ``attack``, ``attack-fraction``, ``attack-scale``;
off by default, and then nothing here runs). The threat model, each attack and the
defences it meets: ``docs/robustness.md``.

A seeded share of the partitions (:func:`attackers`) turns hostile; the others stay
honest. Attackers are white-box: they know the code, the run config and seed, the
reference set with its labels, and the rows the market scored in the round before
(the rows the targets of this round's instruction leave out; none in a round without
targets); not the rows it will score this round, which the server draws after every
upload is in.

Market family (what the attacker uploads instead of its honest logits ``z``, ``[M, C]``;
``s`` = ``attack-scale``):

- ``gaming``: the true labels (one-hot x s) on the rows it believes held out (those
  its last targets left out), confident wrong labels on every other row: a perfect
  teacher where it thinks the market scores, a poisoner where clients learn;
- ``budgeted``: the true labels on every row but a budget (``attack-budget``) of the
  rows it believes are distilled, where it uploads its most likely wrong class: loud
  (one-hot x s) or, with ``attack-scale`` = 0, quiet (its own logits with the top class
  swapped, as loud as an honest client); every colluder picks the same budget rows (from
  the run's seed and the round) and adds its own Gaussian noise of std ``attack-noise``,
  so that they are not near-copies;
- ``rolled``: ``z`` with its classes rolled by one; ``sign-flip``: ``-z``;
- ``cpa``: each row pushes (one-hot x s) the class least correlated, over the reference
  set, with the class the attacker predicts; ``celmax``: the class it finds least likely
  (Roux, Zimmer, Pokutta, arXiv 2402.12265);
- ``scaled``: ``s * z``; ``confident-wrong``: the most likely wrong class, one-hot x s;
- ``random``: Gaussian logits of standard deviation s;
- ``sybil``: every attacker uploads the same confident wrong labels (one shared seeded
  draw), to gain weight by numbers;
- ``copy-targets``: a free rider: on every row its instruction carries targets for, the
  targets' top class (one-hot x s), the others' consensus repeated at full confidence;
  its honest logits elsewhere (against the unlabeled mode, which scores agreement with
  the consensus, ``docs/robustness.md``);
- ``malformed``: broken replies (NaN logits, then metrics without ``num-examples``, then
  oversized logits), for the boundary's end-to-end test.

Every family: ``label-flip`` trains on private labels ``C - 1 - y``. Parameter and
personalization families: ``negated`` replies ``g - s (w - g)`` and ``scaled-update``
``g + s (w - g)`` for the global model ``g`` and the trained ``w``; compressed family:
the compressed update ``u`` becomes ``-s u`` or ``s u``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from kta_flwr.client.node import Node
from kta_flwr.config import LOGIT_ATTACKS, RunConfig
from kta_flwr.factory import knowledge_codec
from kta_flwr.flower import protocol, sync
from kta_flwr.task.datasets import ArrayDataset



def attackers(cfg: RunConfig, num_partitions: int) -> frozenset[int]:
    """The hostile partitions: ``round(attack-fraction * num_partitions)`` of them, drawn
    from the run's seed (the same on every node, the server and the benchmarks)."""
    if cfg.attack == "none":
        return frozenset()
    count = int(math.floor(cfg.attack_fraction * num_partitions + 0.5))
    order = np.random.default_rng([cfg.seed, 4242]).permutation(num_partitions)
    return frozenset(int(p) for p in order[:count])


def is_attacker(node: Node) -> bool:
    """True if this node's partition is hostile in this run."""
    num = int(node.context.node_config["num-partitions"])
    return node.partition_id in attackers(node.cfg, num)


def poison_data(node: Node) -> None:
    """``label-flip``: the node trains on labels ``C - 1 - y`` (its cached data is not
    touched)."""
    if node.cfg.attack != "label-flip" or not is_attacker(node):
        return
    train = node.data.train
    flipped = ArrayDataset(train.x, train.num_classes - 1 - train.y, train.num_classes)
    node.data = dataclasses.replace(node.data, train=flipped)


def _one_hot(classes: np.ndarray, num_classes: int, scale: float) -> np.ndarray:
    return (scale * np.eye(num_classes, dtype=np.float32)[classes]).astype(np.float32)


def poisoned_logits(  # pylint: disable=too-many-arguments
    cfg: RunConfig, attack: str, logits: np.ndarray, labels: np.ndarray, held_out: np.ndarray,
    seed: int, server_round: int = 0, sent: np.ndarray | None = None,
) -> np.ndarray:
    """What an attacker uploads instead of its honest ``logits`` (``[M, C]``) on reference
    rows with ``labels`` (``[M]``) and ``held_out`` (``[M]`` bool: the rows it believes
    the market scores, those its last targets left out).

    Args:
        seed: the node's seed for this round (``random``, ``budgeted``'s noise); ``sybil``
            uses the run's seed, so every attacker uploads the same rows.
        server_round: the round (``budgeted``'s budget rows, shared by the colluders).
        sent: ``[M, C]`` the targets the attacker was sent on the same rows, NaN rows where
            it was sent none (``copy-targets``; None: no targets at all).
    """
    z = np.asarray(logits, np.float32)
    num_classes, scale = z.shape[1], cfg.attack_scale
    wrong = z.copy()
    wrong[np.arange(len(labels)), labels] = -np.inf
    most_likely_wrong = wrong.argmax(axis=1)
    if attack == "gaming":
        shifted = (labels + 1) % num_classes
        return np.where(held_out[:, None], _one_hot(labels, num_classes, scale),
                        _one_hot(shifted, num_classes, scale))
    if attack == "rolled":
        return np.roll(z, 1, axis=1)
    if attack == "sign-flip":
        return -z
    if attack == "cpa":
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        corr = np.nan_to_num(np.corrcoef(probs.T), nan=0.0)
        np.fill_diagonal(corr, np.inf)
        return _one_hot(corr.argmin(axis=1)[z.argmax(axis=1)], num_classes, scale)
    if attack == "celmax":
        return _one_hot(z.argmin(axis=1), num_classes, scale)
    if attack == "scaled":
        return scale * z
    if attack == "confident-wrong":
        return _one_hot(most_likely_wrong, num_classes, scale)
    if attack == "random":
        return np.random.default_rng(seed).normal(0.0, scale, z.shape).astype(np.float32)
    if attack == "budgeted":
        return _budgeted(cfg, z, labels, held_out, most_likely_wrong, seed, server_round)
    if attack == "copy-targets":
        if sent is None:
            return z
        have = ~np.isnan(sent).any(axis=1)
        return np.where(have[:, None], _one_hot(np.nan_to_num(sent).argmax(axis=1), num_classes, scale), z)
    if attack == "sybil":
        offset = np.random.default_rng([cfg.seed, 77]).integers(1, num_classes, len(labels))
        return _one_hot((labels + offset) % num_classes, num_classes, scale)
    raise ValueError(f"{attack!r} is not a logit attack; use one of {list(LOGIT_ATTACKS)}")


def _budgeted(cfg: RunConfig, z: np.ndarray, labels: np.ndarray, held_out: np.ndarray,
              wrong: np.ndarray, seed: int, server_round: int) -> np.ndarray:
    """``budgeted``: ``[M, C]`` uploads that give the true ``labels`` (``[M]``) but on
    ``attack-budget`` of the rows not believed held out, where the most likely wrong class
    ``wrong`` (``[M]``) wins. The budget rows come from the run's seed and the round (the
    same for every colluder); ``seed`` (the node's) draws its own noise."""
    candidates = np.flatnonzero(~held_out)
    budget = int(math.floor(cfg.attack_budget * len(candidates) + 0.5))
    chosen = np.asarray(labels).copy()
    poisoned = np.random.default_rng([cfg.seed, 4343, server_round]).choice(candidates, budget, replace=False)
    chosen[poisoned] = wrong[poisoned]
    if cfg.attack_scale > 0:  # loud
        out = _one_hot(chosen, z.shape[1], cfg.attack_scale)
    else:  # quiet: the attacker's own logits, its top class swapped with the chosen one
        out = z.copy()
        rows = np.arange(len(z))
        top = z.argmax(axis=1)
        out[rows, top], out[rows, chosen] = z[rows, chosen], z[rows, top]
    if cfg.attack_noise > 0:
        out += np.random.default_rng([seed, 4343]).normal(0.0, cfg.attack_noise, out.shape).astype(np.float32)
    return out


def poison_reply(node: Node, msg: Message, content: RecordDict, metrics: dict[str, float]) -> None:
    """Replace what an attacker's honest reply carries (in place): its logits (market),
    its weights (parameters), its compressed update, or the whole reply (``malformed``)."""
    cfg = node.cfg
    if cfg.attack in ("none", "label-flip") or not is_attacker(node):
        return
    if cfg.attack in LOGIT_ATTACKS and protocol.LOGITS in content.array_records:
        rows = node.reference_rows(protocol.LOGITS_SUBSET)
        reference = node.data.splits.reference
        codec = knowledge_codec(cfg)
        num_rows = len(rows) + len(node.transfer_rows(protocol.LOGITS_SUBSET))
        honest = protocol.unpack(content, protocol.LOGITS, num_rows, reference.num_classes, codec)
        # what the attacker knows: the reference labels, the last scored rows; on
        # transfer rows (after the reference rows) its own top class stands for the label
        labels = np.concatenate([reference.y[rows], honest[len(rows):].argmax(axis=1)])
        held_out = np.concatenate([node.held_out()[rows], np.zeros(len(honest) - len(rows), bool)])
        sent = _sent_targets(node, msg, rows, len(honest)) if cfg.attack == "copy-targets" else None
        content[protocol.LOGITS] = protocol.pack(poisoned_logits(
            cfg, cfg.attack, honest, labels, held_out, node.seed, node.server_round, sent), codec)
    elif cfg.attack in ("negated", "scaled-update") and sync.UPDATE in content.array_records:
        content[sync.UPDATE] = sync.to_record(_poisoned_update(node, content))
    elif cfg.attack in ("negated", "scaled-update"):
        sign = -1.0 if cfg.attack == "negated" else 1.0
        sent = msg.content.array_records[protocol.ARRAYS]
        trained = content.array_records[protocol.ARRAYS]
        poisoned = {}
        for name, array in trained.items():
            w, g = array.numpy(), sent[name].numpy()
            if np.issubdtype(w.dtype, np.floating):
                w = (g + sign * cfg.attack_scale * (w - g)).astype(w.dtype)
            poisoned[name] = Array(np.ascontiguousarray(w))
        content[protocol.ARRAYS] = ArrayRecord(poisoned)
    elif cfg.attack == "malformed":
        _malformed(node, content, metrics)


def _sent_targets(node: Node, msg: Message, rows: np.ndarray, num_rows: int) -> np.ndarray | None:
    """``[num_rows, C]``: the targets ``msg`` carries on the reference ``rows`` of the upload
    (the first ``len(rows)`` of its ``num_rows``), NaN on the others; None without targets."""
    if not node.has_targets:
        return None
    num_classes = node.data.splits.num_classes
    targets = protocol.unpack(msg.content, protocol.TARGETS, node.num_target_rows(), num_classes,
                              knowledge_codec(node.cfg))
    target_rows = node.target_rows()
    where = np.full(len(node.data.reference.y), -1)
    where[target_rows] = np.arange(len(target_rows))
    position = np.full(num_rows, -1)
    position[:len(rows)] = where[rows]
    out = np.full((num_rows, num_classes), np.nan, np.float32)
    out[position >= 0] = targets[position[position >= 0]]
    return out


def _poisoned_update(node: Node, content: RecordDict) -> dict[str, np.ndarray]:
    """Compressed family: the honest update ``u`` (decoded) becomes ``-s u`` (``negated``)
    or ``s u`` (``scaled-update``), compressed again as the honest one was (Top-k keeps
    the same positions; SVD the same rank)."""
    sign = -1.0 if node.cfg.attack == "negated" else 1.0
    _, _, codec = node.shared()
    honest = codec.decompress(sync.from_record(content.array_records[sync.UPDATE]))
    return codec.compress((sign * node.cfg.attack_scale * honest).astype(np.float32), node.server_round)


def _malformed(node: Node, content: RecordDict, metrics: dict[str, float]) -> None:
    """Round 1: NaN logits; round 2: no ``num-examples``; later: oversized logits."""
    values = content.array_records[protocol.LOGITS][protocol.VALUES].numpy()
    if node.server_round <= 1:
        content[protocol.LOGITS] = ArrayRecord({protocol.VALUES: Array(np.full_like(values, np.nan))})
    elif node.server_round == 2:
        del metrics["num-examples"]
    else:
        content[protocol.LOGITS] = ArrayRecord({protocol.VALUES: Array(np.tile(values, (4, 1)))})
