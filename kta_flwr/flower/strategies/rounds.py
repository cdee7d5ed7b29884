"""Run a strategy through Flower's ``Strategy.start`` from any round, and keep what each
round's aggregation said.

``Strategy.start`` numbers rounds from 1. A resumed run continues at round ``first``:
:class:`RoundsFrom` wraps the real strategy and shifts every round number by
``first - 1``, so the strategy, the clients (their seeds, reference subsets, checkpoints)
and the results see the true round. It also hands each round's aggregated train metrics
to a callback (the results file is written after every round, not from ``start``'s
return value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class RoundsFrom(Strategy):
    """``inner`` with rounds ``1, 2, ...`` of ``start`` mapped to ``first, first + 1, ...``.

    Args:
        inner: the strategy that does the work.
        first: the true number of ``start``'s round 1.
        on_train_metrics: called with (true round, aggregated train metrics).
    """

    def __init__(
        self, inner: Strategy, first: int = 1,
        on_train_metrics: Callable[[int, MetricRecord], None] | None = None,
    ) -> None:
        self.inner = inner
        self.offset = first - 1
        self.on_train_metrics = on_train_metrics

    def true_round(self, server_round: int) -> int:
        """The round number the strategy and the clients see."""
        return server_round + self.offset

    def summary(self) -> None:
        """The inner strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's train messages for the true round."""
        return self.inner.configure_train(self.true_round(server_round), arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner aggregation of the true round; its metrics go to the callback."""
        arrays, metrics = self.inner.aggregate_train(self.true_round(server_round), replies)
        if metrics is not None and self.on_train_metrics is not None:
            self.on_train_metrics(self.true_round(server_round), metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluate messages for the true round."""
        return self.inner.configure_evaluate(self.true_round(server_round), arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner evaluation aggregate of the true round."""
        return self.inner.aggregate_evaluate(self.true_round(server_round), replies)
