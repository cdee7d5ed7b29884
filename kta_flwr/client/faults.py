"""Injected faults, for the fault tests and benchmarks (run-config ``fault-dropout``,
``fault-straggler``; both 0 by default, and then nothing here runs).

Whether a client fails in a round is drawn from (seed, partition, round), so a run's
faults are reproducible and the same in every strategy.
"""

from __future__ import annotations

import time

import numpy as np

from kta_flwr.client.node import Node


class InjectedDropout(RuntimeError):
    """The client was told to fail this round (``fault-dropout``)."""


def inject_faults(node: Node) -> None:
    """Raise :class:`InjectedDropout` with probability ``fault-dropout``; else sleep past
    the round timeout with probability ``fault-straggler`` (the reply comes too late)."""
    cfg = node.cfg
    if cfg.fault_dropout == 0 and cfg.fault_straggler == 0:
        return
    draw = np.random.default_rng([cfg.seed, node.partition_id, node.server_round, 7]).random(2)
    if draw[0] < cfg.fault_dropout:
        raise InjectedDropout(
            f"injected dropout: partition {node.partition_id}, round {node.server_round}"
        )
    if draw[1] < cfg.fault_straggler:
        time.sleep(cfg.round_timeout + 2.0)
