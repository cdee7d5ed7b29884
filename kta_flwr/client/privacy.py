"""A node's differential privacy: its DP-SGD settings, the plan its target ε is
calibrated on, its ledger of what it spent, and the noisy logits it may upload.

**Example-level DP-SGD** (``dp-epsilon`` or ``dp-noise``): every training call that reads
the node's private rows runs :func:`kta_flwr.task.privacy.dp_sgd`. With ``dp-epsilon``
the noise multiplier is the smallest whose **plan** stays within the target at
``dp-delta`` (default ``1 / n``, n the node's training rows): every planned round's calls
as if the node trained in all ``num-server-rounds`` (:func:`planned_calls`). The node
records each call's spend per run, round and phase in its :class:`Ledger`, one per node
for its data across runs, ``<model folder>/privacy-ledger.json`` (written atomically
under a lock; a replayed round replaces its entries, so resuming never resets or
double-counts it), and reports the ε of this run's calls as the train metric
``dp-epsilon`` and the accountant's composition over every run that touched the data as
``dp-lifetime-epsilon`` (:class:`NodePrivacy`). With ``dp-lifetime-epsilon`` set, a run
whose plan would take the data past it is refused before it trains.

**Noisy logits** (``logit-noise`` = z, market strategies): the Gaussian mechanism on the
whole uploaded payload (:mod:`kta_flwr.maths.noisy_logits`), a node-level guarantee;
its ε, composed over the rounds the node uploaded, is the train metric ``logit-epsilon``. ``docs/privacy.md`` says what either
covers and what it does not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from kta_flwr.config import ConfigError, RunConfig
from kta_flwr.flower import protocol
from kta_flwr.storage import exclusive, write_text_atomic
from kta_flwr.task.privacy import PrivateTraining, Spend, epsilon_spent, noise_for_target
from kta_flwr.task.training import stage2_rate

#: Ledger phases: the train instruction's calls, evaluation's (fedavg-ft's fine-tuning),
#: and the noisy uploads.
TRAIN, EVALUATE, UPLOAD = "train", "evaluate", "upload"
#: DP-SGD's phases (example-level ε).
DP_SGD = (TRAIN, EVALUATE)
#: The node's ledger, in its model folder, and its format.
LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT = "kta-flwr-privacy-ledger/1"


def delta_of(cfg: RunConfig, num_private: int) -> float:
    """``dp-delta``, or ``1 / num_private`` when it is 0."""
    return cfg.dp_delta or 1.0 / max(1, num_private)


def stage2_steps(cfg: RunConfig, num_reference: int) -> int:
    """Steps per stage-2 epoch with the most distillation rows any round can have: a
    reference subset's size, at most the rows not held out, and the transfer rows."""
    size = len(protocol.reference_subset(num_reference, cfg.reference_fraction, cfg.seed, 0))
    held_out = protocol.held_out_count(num_reference, cfg.holdout)
    rows = min(size, num_reference - held_out) + cfg.transfer_per_round
    return -(-max(1, rows) // cfg.batch_size)


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


class BudgetExceeded(ConfigError):
    """Training would take the node past its lifetime budget (``dp-lifetime-epsilon``)."""


class Ledger:
    """What a node's data has spent, in every run and warm start that touched it:
    ``<model folder>/privacy-ledger.json``, one per node (its data), across runs and
    strategies. Each run (lineage) keeps its spends per round and phase and the noise
    multiplier calibrated for its plan (calibration takes seconds: once per run and plan).

    The file is updated under a lock (a read-modify-write of this run's entries; other
    runs' entries are kept as the file has them) and written atomically. A ledger of the
    older per-strategy layout (``privacy-<strategy>.json``) is taken in on first use.

    Args:
        folder: the node's model folder; strategy: this run's; lineage: this run's id
            (a resumed run keeps the one it continues).
    """

    def __init__(self, folder: Path, strategy: str, lineage: int) -> None:
        self.path = Path(folder) / LEDGER_FILE
        self.strategy = strategy
        self.lineage = lineage
        self.runs: dict[str, dict] = self._read()
        self._legacy(Path(folder))
        mine = self.runs.get(str(lineage), {})
        #: This run's spends: ``"<round>:<phase>" -> [[noise multiplier, rate, steps], ...]``.
        self.entries: dict[str, list[list[float]]] = dict(mine.get("entries", {}))
        self.calibrated: dict[str, float] = dict(mine.get("calibrated", {}))

    def _read(self) -> dict[str, dict]:
        """The runs in the file (empty if there is none).

        Raises:
            ConfigError: a file that is not a ledger (named): spending is never guessed.
        """
        if not self.path.is_file():
            return {}
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"privacy ledger {self.path} cannot be read ({err}); it records "
                              "what this node's data has spent, so the node does not train "
                              "without it: restore it, or move it away to start a new one") from None
        if not isinstance(saved, dict) or saved.get("format") != LEDGER_FORMAT \
                or not isinstance(saved.get("runs"), dict):
            raise ConfigError(f"privacy ledger {self.path} is not a {LEDGER_FORMAT} file")
        return saved["runs"]

    def _legacy(self, folder: Path) -> None:
        """Take in the per-strategy ledgers of earlier versions (one run each)."""
        for old in sorted(folder.glob("privacy-*.json")):
            if old.name == LEDGER_FILE:
                continue
            try:
                saved = json.loads(old.read_text(encoding="utf-8"))
                key = str(int(saved["lineage"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            self.runs.setdefault(key, {"strategy": old.stem[len("privacy-"):],
                                       "entries": saved.get("entries", {}),
                                       "calibrated": saved.get("calibrated", {})})

    def record(self, server_round: int, phase: str, spends: list[Spend]) -> None:
        """Set round ``server_round``'s ``phase`` to ``spends`` (a replayed round replaces
        what it spent before: it reran the same mechanism with the same randomness on the
        same state, so its output is the one already released); :meth:`save` writes it."""
        key = f"{server_round}:{phase}"
        self.entries[key] = [[s.noise_multiplier, s.sample_rate, s.steps] for s in spends]
        if not spends:
            del self.entries[key]

    def save(self) -> None:
        """Write this run's entries into the file (under its lock, atomically)."""
        with exclusive(self.path.with_name(self.path.name + ".lock")):
            runs = self._read()
            runs[str(self.lineage)] = {"strategy": self.strategy, "entries": self.entries,
                                       "calibrated": self.calibrated}
            write_text_atomic(self.path, json.dumps({"format": LEDGER_FORMAT, "runs": runs}))
            self.runs = runs

    def noise_for(self, plan_key: str, calibrate: Callable[[], float]) -> float:
        """The noise multiplier kept for ``plan_key``, else ``calibrate()``'s (kept)."""
        if plan_key not in self.calibrated:
            self.calibrated = {plan_key: calibrate()}
            self.save()
        return self.calibrated[plan_key]

    def spends(self, phases: tuple[str, ...], *, this_run: bool = True,
               other_runs: bool = False) -> list[Spend]:
        """The recorded spends of ``phases``: this run's and/or the other runs'."""
        tables = [self.entries] if this_run else []
        if other_runs:
            tables += [run.get("entries", {}) for key, run in self.runs.items()
                       if key != str(self.lineage)]
        return [Spend(sigma, rate, int(steps)) for table in tables for key, spent in table.items()
                if key.split(":")[1] in phases for sigma, rate, steps in spent]

    def epsilon(self, delta: float, phases: tuple[str, ...], lifetime: bool = False) -> float:
        """ε at ``delta`` of this run's spends of ``phases`` (``lifetime``: of every run's,
        composed by the accountant)."""
        return epsilon_spent(self.spends(phases, other_runs=lifetime), delta)


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
        ``dp-noise``, or the noise calibrated on :func:`planned_calls` to ``dp-epsilon``; refused
        when that plan would pass the node's lifetime budget.

        Raises:
            ValueError: a target too small for any noise.
            BudgetExceeded: this run's plan would take the node's data past
                ``dp-lifetime-epsilon`` (checked before any training: nothing is lost).
        """
        cfg = self.cfg
        if not cfg.private:
            return None
        if self._training is None:
            noise = cfg.dp_noise
            plan = planned_calls(cfg, self.num_private, self.num_reference)
            if noise <= 0:
                key = json.dumps([cfg.dp_epsilon, self.delta, plan])
                noise = self.ledger.noise_for(key, lambda: noise_for_target(
                    cfg.dp_epsilon, self.delta, plan) if plan else 1.0)
            self._check_lifetime([Spend(noise, rate, steps) for rate, steps in plan])
            self._training = PrivateTraining(noise_multiplier=noise, clip=cfg.dp_clip, seed=self.seed)
        return self._training

    def _check_lifetime(self, planned: list[Spend]) -> None:
        """Refuse a run whose plan, composed with every earlier run's spends on this data,
        would pass ``dp-lifetime-epsilon`` (0: no lifetime budget).

        Raises:
            BudgetExceeded: naming the budget, what was spent, the plan and the ledger.
        """
        budget = self.cfg.dp_lifetime_epsilon
        if budget <= 0:
            return
        earlier = self.ledger.spends(DP_SGD, this_run=False, other_runs=True)
        prospective = epsilon_spent(earlier + planned, self.delta)
        if prospective <= budget:
            return
        runs = sum(1 for key, run in self.ledger.runs.items()
                   if key != str(self.ledger.lineage) and run.get("entries"))
        raise BudgetExceeded(
            f"{self.ledger.path.parent.name}: refusing to train: this run's plan "
            f"(epsilon {epsilon_spent(planned, self.delta):.3g}) after what {runs} earlier "
            f"run(s) on this data spent (epsilon {epsilon_spent(earlier, self.delta):.3g}) "
            f"composes to epsilon {prospective:.3g} at delta {self.delta:.3g}, past run-config "
            f"'dp-lifetime-epsilon' = {budget:g} (ledger {self.ledger.path}); nothing was "
            "trained or changed. Lower 'dp-epsilon' or raise 'dp-lifetime-epsilon'")

    def stage2_rate(self) -> float:
        """Stage 2's planned Poisson rate for the private term."""
        steps = stage2_steps(self.cfg, self.num_reference)
        return stage2_rate(max(1, self.num_private), steps)

    def settle(self, server_round: int, phase: str, metrics: dict[str, float] | None = None) -> None:
        """Record what this message's training (and, in a ``train`` phase, its noisy
        upload) spent and, given ``metrics``, report the ε spent so far: this run's
        (``dp-epsilon``, ``logit-epsilon``) and the data's over every run
        (``dp-lifetime-epsilon``)."""
        if self.cfg.private:
            spent = self._training.spent if self._training is not None else []
            self.ledger.record(server_round, phase, spent)
            if metrics is not None:
                metrics["dp-epsilon"] = self.ledger.epsilon(self.delta, DP_SGD)
                metrics["dp-lifetime-epsilon"] = self.ledger.epsilon(self.delta, DP_SGD, lifetime=True)
        if self.cfg.logit_noise > 0 and phase == TRAIN:
            self.ledger.record(server_round, UPLOAD, [Spend(self.cfg.logit_noise, 1.0, 1)])
            if metrics is not None:
                metrics["logit-epsilon"] = self.ledger.epsilon(self.delta, (UPLOAD,))
        if self.cfg.private or phase == TRAIN:  # something was recorded
            self.ledger.save()
