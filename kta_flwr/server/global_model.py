"""The server's global model under the market (``server-model``): distilled each round on
the public reference rows (and, with a transfer set, the transfer rows exchanged so
far) toward the consensus of the clients' uploads.

What it learns from is what the server already holds: the public rows' inputs and labels
and the market's consensus of the uploaded predictions on them
(:meth:`~kta_flwr.flower.strategies.base.NodeStrategy.take_consensus`,
:func:`~kta_flwr.maths.market.global_consensus`, with the market's defences). It never
sees a client's data or weights, and nothing more crosses the wire: the clients' bytes
are those of the run without it. It keeps the latest consensus of every public row (a
rotating reference subset covers the rows over rounds), trains ``server-model-epochs``
epochs a round at ``server-model-learning-rate`` (KL toward the consensus at ``temperature`` plus
``server-model-label-weight`` × cross-entropy on the labels; ``server-model-teacher =
"labels"``: cross-entropy on the labels alone, the baseline without the clients; images shifted and,
where labels survive it, flipped: ``server-model-augment``), is evaluated on the whole
test set after every round, saved in the server's checkpoint (a resumed run continues
it) and, at the end, as ``global-model.pt``. ``docs/method.md#the-servers-global-model``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from kta_flwr.config import MIRRORABLE_DATASETS, RunConfig
from kta_flwr.flower.results import SERVER_GLOBAL
from kta_flwr.flower.strategies.base import Consensus
from kta_flwr.maths.market import softmax
from kta_flwr.task.models import build_model
from kta_flwr.task.splits import ArrayDataset, CentralSplits, shared_split
from kta_flwr.task.training import Optim, distill, evaluate, predict_logits, shifts_and_flips

__all__ = ["SERVER_GLOBAL", "ServerModel"]


class ServerModel:
    """The server's global model of architecture ``cfg.server_model``, on ``device``."""

    def __init__(self, cfg: RunConfig, splits: CentralSplits, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.architecture = cfg.server_model
        self.model: nn.Module = build_model(self.architecture, splits.spec_for(cfg), cfg.seed)
        self.public = shared_split(splits, "reference", self.architecture)
        #: Where the transfer rows start in :attr:`public` (after the reference rows).
        self.num_reference = len(self.public.y)
        if splits.transfer is not None and cfg.transfer_per_round > 0:  # its rows, labels UNLABELED
            transfer = shared_split(splits, "transfer", self.architecture)
            self.public = ArrayDataset(np.concatenate([self.public.x, transfer.x]),
                                       np.concatenate([self.public.y, transfer.y]), self.public.num_classes)
        self.test = shared_split(splits, "test", self.architecture)
        #: ``[N_ref + N_transfer, C]`` the latest consensus of each public row (NaN: none yet).
        self.targets = np.full((len(self.public.y), splits.num_classes), np.nan, np.float32)

    def learn(self, server_round: int, consensus: Consensus | None) -> float:
        """Bank ``consensus`` (None: nothing new this round) and train on every public row
        with a consensus; returns the mean training loss (0 before any consensus)."""
        if consensus is not None:
            if self.cfg.server_model_teacher == "consensus":
                self.targets[consensus.rows] = consensus.targets
                if len(consensus.transfer_rows):
                    self.targets[self.num_reference + consensus.transfer_rows] = consensus.transfer_targets
            else:  # the labels alone: no transfer row has one
                self.targets[consensus.rows] = np.eye(self.targets.shape[1])[self.public.y[consensus.rows]]
        known = np.flatnonzero(~np.isnan(self.targets[:, 0]))
        if len(known) == 0:
            return 0.0
        cfg = self.cfg
        labels_only = cfg.server_model_teacher == "labels"  # plain cross-entropy on the labels
        seed = cfg.seed * 1_000_003 + server_round
        augment = None
        if cfg.server_model_augment and self.public.x.ndim == 4:  # images [N, C, H, W]
            augment = shifts_and_flips(seed, max(1, self.public.x.shape[-1] // 8),
                                       flip=cfg.dataset in MIRRORABLE_DATASETS)
        return distill(
            self.model, self.public.x[known], self.targets[known],
            epochs=cfg.server_model_epochs, batch_size=cfg.batch_size,
            optim=Optim(cfg.server_model_lr, cfg.momentum, cfg.weight_decay),
            device=self.device, seed=seed, temperature=cfg.temperature,
            kl_weight=0.0 if labels_only else 1.0, y_ref=self.public.y[known],
            ce_weight=1.0 if labels_only else cfg.server_model_label_weight,
            max_grad_norm=cfg.distill_clip, augment=augment, recalibrate=cfg.bn_recalibrate,
        )

    def predict(self, rows: np.ndarray, transfer_rows: np.ndarray) -> np.ndarray:
        """``[M + T, C]`` float32 probabilities at ``temperature`` on reference rows
        ``rows`` then transfer rows ``transfer_rows`` (what it teaches with
        ``server-model-teacher-weight``)."""
        inputs = self.public.x[np.concatenate([rows, self.num_reference + np.asarray(transfer_rows, int)])]
        return softmax(predict_logits(self.model, inputs, self.device), self.cfg.temperature).astype(np.float32)

    def accuracy(self) -> float:
        """Top-1 accuracy on the whole test set."""
        num_classes = self.targets.shape[1]
        return evaluate(self.model, self.test.x, self.test.y, np.full(num_classes, 1.0 / num_classes),
                        self.device).accuracy

    def arrays(self) -> ArrayRecord:
        """The model's state as Flower arrays on the host (what a newcomer starts from)."""
        return ArrayRecord(OrderedDict((name, Array(value)) for name, value in self.tensors().items()))

    def tensors(self) -> dict[str, np.ndarray]:
        """The model's state (names -> host arrays)."""
        return {name: value.detach().cpu().numpy() for name, value in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run continues from: the weights and the banked consensus."""
        return {"architecture": self.architecture, "weights": self.tensors(), "targets": self.targets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the state is of another architecture or shape.
        """
        if state["architecture"] != self.architecture:
            raise ValueError(f"the saved server model is {state['architecture']!r}, "
                             f"not {self.architecture!r}")
        targets = np.asarray(state["targets"], np.float32)
        if targets.shape != self.targets.shape:
            raise ValueError(f"the saved consensus has shape {targets.shape}, not {self.targets.shape}")
        self.model.load_state_dict({name: torch.from_numpy(np.array(value))
                                    for name, value in state["weights"].items()})
        self.targets = targets
