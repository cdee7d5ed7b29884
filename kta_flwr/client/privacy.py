"""A node's differential privacy: its DP-SGD settings, the plan its target ε is
calibrated on, its ledger of what it spent, and the noisy logits it may upload.

**Example-level DP-SGD** (``dp-epsilon`` or ``dp-noise``): every training call that reads
the node's private rows runs :func:`kta_flwr.task.privacy.dp_sgd`. With ``dp-epsilon``
the noise multiplier is the smallest whose **plan** stays within the target at
``dp-delta`` (default ``1 / n``, n the node's training rows): every planned round's calls
as if the node trained in all ``num-server-rounds`` (:func:`planned_calls`). The node
records each call's spend per round and phase in its :class:`Ledger`,
``<model folder>/privacy-<strategy>.json`` (written atomically; a replayed round replaces
its entries), and reports the ε of all of them as the train metric ``dp-epsilon``
(:class:`NodePrivacy`).

**Noisy logits** (``logit-noise`` = z, market strategies): the Gaussian mechanism on the
whole uploaded payload (:mod:`kta_flwr.maths.noisy_logits`), a node-level guarantee;
its ε, composed over the rounds the node uploaded, is the train metric ``logit-epsilon``. ``docs/privacy.md`` says what either
covers and what it does not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from kta_flwr.config import RunConfig
from kta_flwr.flower import protocol
from kta_flwr.storage import write_text_atomic
from kta_flwr.task.privacy import PrivateTraining, Spend, epsilon_spent, noise_for_target
from kta_flwr.task.training import stage2_rate

#: Ledger phases: the train instruction's calls, evaluation's (fedavg-ft's fine-tuning),
#: and the noisy uploads.
TRAIN, EVALUATE, UPLOAD = "train", "evaluate", "upload"


def delta_of(cfg: RunConfig, num_private: int) -> float:
    """``dp-delta``, or ``1 / num_private`` when it is 0."""
    return cfg.dp_delta or 1.0 / max(1, num_private)


def stage2_steps(cfg: RunConfig, num_reference: int) -> int:
    """Steps per stage-2 epoch with the most distillation rows any round can have: a
    reference subset's size, at most the rows not held out."""
    size = len(protocol.reference_subset(num_reference, cfg.reference_fraction, cfg.seed, 0))
    held_out = int(protocol.held_out_mask(num_reference, cfg.holdout, cfg.seed).sum())
    return -(-max(1, min(size, num_reference - held_out)) // cfg.batch_size)


def planned_calls(cfg: RunConfig, num_private: int, num_reference: int) -> list[tuple[float, int]]:
    """``(sample rate, steps)`` of every DP training call a node with ``num_private``
    rows makes if it trains in every round (and, under fedavg-ft, fine-tunes at every
    evaluation): the plan a target ε is calibrated on."""
    if num_private == 0:
        return []
    steps = -(-num_private // cfg.batch_size)
    rate = min(1.0, cfg.batch_size / num_private)
    per_round = [(rate, cfg.local_epochs * steps)]
    if cfg.strategy == "ditto":  # the personal model and the global one
        per_round.append((rate, cfg.local_epochs * steps))
    if cfg.strategy == "fedrep":  # the head, then the body
        per_round.append((rate, cfg.head_epochs * steps))
    if cfg.exchanges_knowledge and cfg.private_ce_weight > 0 and cfg.distill_epochs > 0:
        ref_steps = stage2_steps(cfg, num_reference)
        per_round.append((stage2_rate(num_private, ref_steps), cfg.distill_epochs * ref_steps))
    plan = per_round * cfg.num_server_rounds
    if cfg.strategy == "fedavg-ft" and cfg.finetune_epochs > 0:
        evaluations = sum(map(cfg.evaluates_in, range(1, cfg.num_server_rounds + 1)))
        plan += [(rate, cfg.finetune_epochs * steps)] * evaluations
    return [(q, s) for q, s in plan if s > 0]


class Ledger:
    """What a node spent, per round and phase, in ``<folder>/privacy-<strategy>.json``,
    and the noise multiplier calibrated for its plan (calibration takes seconds: it is
    done once per run and plan)."""

    def __init__(self, folder: Path, strategy: str, lineage: int) -> None:
        self.path = Path(folder) / f"privacy-{strategy}.json"
        self.lineage = lineage
        self.entries: dict[str, list[list[float]]] = {}
        self.calibrated: dict[str, float] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("lineage") == lineage:  # another run's spending is its own
                self.entries = saved.get("entries", {})
                self.calibrated = saved.get("calibrated", {})

    def _write(self) -> None:
        write_text_atomic(self.path, json.dumps(
            {"lineage": self.lineage, "entries": self.entries, "calibrated": self.calibrated}))

    def record(self, server_round: int, phase: str, spends: list[Spend]) -> None:
        """Set round ``server_round``'s ``phase`` to ``spends`` (a replayed round replaces
        what it spent before); :meth:`save` writes the file."""
        key = f"{server_round}:{phase}"
        self.entries[key] = [[s.noise_multiplier, s.sample_rate, s.steps] for s in spends]
        if not spends:
            del self.entries[key]

    def save(self) -> None:
        """Write the ledger (atomically)."""
        self._write()

    def noise_for(self, plan_key: str, calibrate: Callable[[], float]) -> float:
        """The noise multiplier kept for ``plan_key``, else ``calibrate()``'s (kept)."""
        if plan_key not in self.calibrated:
            self.calibrated = {plan_key: calibrate()}
            self._write()
        return self.calibrated[plan_key]

    def epsilon(self, delta: float, phases: tuple[str, ...]) -> float:
        """ε of every recorded spend of ``phases`` at ``delta``."""
        return epsilon_spent(
            (Spend(sigma, rate, int(steps)) for key, spends in self.entries.items()
             if key.split(":")[1] in phases for sigma, rate, steps in spends),
            delta,
        )


class NodePrivacy:  # pylint: disable=too-many-instance-attributes
    """One message's privacy on a node: its DP-SGD settings (calibrated on first use) and
    the settling of what the message spent.

    Args:
        cfg: the run config (``dp-*``, ``logit-*``); num_private: the node's training
            rows; num_reference: the reference set's rows; folder: the node's model
            folder (its ledger); lineage: the run the ledger belongs to; seed: the
            message's seed (DP noise).
    """

    def __init__(self, cfg: RunConfig, *, num_private: int, num_reference: int, folder: Path,
                 lineage: int, seed: int) -> None:
        self.cfg = cfg
        self.num_private = num_private
        self.num_reference = num_reference
        self.ledger = Ledger(folder, cfg.strategy, lineage)
        self.seed = seed
        self.delta = delta_of(cfg, num_private)
        self._training: PrivateTraining | None = None

    def training(self) -> PrivateTraining | None:
        """DP-SGD settings for this message's training calls (None: DP-SGD off):
        ``dp-noise``, or the noise calibrated on :func:`planned_calls` to ``dp-epsilon``.

        Raises:
            ValueError: a target too small for any noise.
        """
        cfg = self.cfg
        if not cfg.private:
            return None
        if self._training is None:
            noise = cfg.dp_noise
            if noise <= 0:
                plan = planned_calls(cfg, self.num_private, self.num_reference)
                key = json.dumps([cfg.dp_epsilon, self.delta, plan])
                noise = self.ledger.noise_for(key, lambda: noise_for_target(
                    cfg.dp_epsilon, self.delta, plan) if plan else 1.0)
            self._training = PrivateTraining(noise_multiplier=noise, clip=cfg.dp_clip, seed=self.seed)
        return self._training

    def stage2_rate(self) -> float:
        """Stage 2's planned Poisson rate for the private term."""
        steps = stage2_steps(self.cfg, self.num_reference)
        return stage2_rate(max(1, self.num_private), steps)

    def settle(self, server_round: int, phase: str, metrics: dict[str, float] | None = None) -> None:
        """Record what this message's training (and, in a ``train`` phase, its noisy
        upload) spent and, given ``metrics``, report the ε spent so far (``dp-epsilon``,
        ``logit-epsilon``)."""
        if self.cfg.private:
            spent = self._training.spent if self._training is not None else []
            self.ledger.record(server_round, phase, spent)
            if metrics is not None:
                metrics["dp-epsilon"] = self.ledger.epsilon(self.delta, (TRAIN, EVALUATE))
        if self.cfg.logit_noise > 0 and phase == TRAIN:
            self.ledger.record(server_round, UPLOAD, [Spend(self.cfg.logit_noise, 1.0, 1)])
            if metrics is not None:
                metrics["logit-epsilon"] = self.ledger.epsilon(self.delta, (UPLOAD,))
        if self.cfg.private or phase == TRAIN:  # something was recorded
            self.ledger.save()
