"""Wall-clock time per named phase, reported by clients as ``t-<phase>`` metrics.

The efficiency benchmark (:mod:`kta_flwr.tools.efficiency`) sums these over clients and rounds
to say where a run's time goes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Prefix of the per-phase seconds in a client's reply metrics.
PREFIX = "t-"
#: Phases of a client's train reply: config + data (cached per process), restoring its
#: model (market) or loading the global one, stage 1, stage 2, reference logits, saving
#: the model to the node state and its checkpoint (market) or into the reply (FedAvg/FedProx).
TRAIN_PHASES = ("setup", "restore", "stage1", "stage2", "predict", "save")
#: Phases of a client's evaluate reply (``save``: the accuracies into its checkpoint).
EVALUATE_PHASES = ("setup", "restore", "evaluate", "save")


class PhaseTimer:
    """Accumulates seconds per phase: ``with timer("stage1"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``{"t-<phase>": seconds}`` for a MetricRecord."""
        return {PREFIX + phase: round(sec, 6) for phase, sec in self.seconds.items()}
