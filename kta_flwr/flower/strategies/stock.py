"""Flower's stock parameter strategies (FedAvg, FedProx and the robust aggregators
FedMedian, Krum, FedTrimmedAvg), their maths unchanged, behind our one interface.

:class:`StockStrategy` is a :class:`~kta_flwr.flower.strategies.base.NodeStrategy` that
delegates the stock strategy's own work to a Flower instance (``flower``): building the
instructions (``configure_train``/``configure_evaluate``, FedProx's ``proximal-mu``
included) and aggregating the arrays (``aggregate_train``). Everything else is ours, as
for every other strategy: the node wait and the seeded sample (the Flower instance sees
only the sampled nodes, :class:`~kta_flwr.flower.grids.SampledGrid`), the lineage in the
config, the boundary checks of every reply before the Flower instance sees it, and the
global model it keeps as saved state (so a resumed run continues it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Unpack

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from kta_flwr.flower.grids import SampledGrid
from kta_flwr.flower.protocol import NOTES
from kta_flwr.flower.strategies.base import NodeOptions, NodeStrategy
from kta_flwr.flower.validation import EVALUATE, TRAIN, Checked, ReplySpec, like_model, train_metrics

#: Stock strategy name -> Flower's class.
STOCK: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedmedian": FedMedian, "krum": Krum,
    "fedtrimmedavg": FedTrimmedAvg,
}


def _no_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The Flower instance's metric hook: ours aggregates the metrics (:meth:`NodeStrategy.train_metrics`)."""
    del records, weighting_key
    return MetricRecord()


class StockStrategy(NodeStrategy):
    """A Flower stock strategy under our sampling, screening, lineage and state.

    Args:
        name: a key of :data:`STOCK`.
        flower_options: the Flower class's own options (``proximal_mu``,
            ``num_malicious_nodes``, ``beta``); sampling options are ours.
        initial_arrays: the shared model (or FedRep's body) the first round sends.
        keeps_global_model: whether the arrays are a whole model to keep after the run
            (False for FedRep's body).
        options: sampling and metric hooks, :class:`~kta_flwr.flower.strategies.base.NodeOptions`.
    """

    def __init__(
        self, *, name: str, initial_arrays: ArrayRecord,
        flower_options: Mapping[str, Any] | None = None, keeps_global_model: bool = True,
        **options: Unpack[NodeOptions],
    ) -> None:
        super().__init__(**options)
        self.name = name
        # The Flower instance addresses every node it is shown: ours samples.
        self.flower = STOCK[name](
            fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
            min_available_nodes=1, train_metrics_aggr_fn=_no_metrics,
            evaluate_metrics_aggr_fn=_no_metrics, **(flower_options or {}),
        )
        self.keeps_global_model = keeps_global_model
        #: The global model after the last aggregation (what the next round sends).
        self.arrays = initial_arrays

    def summary(self) -> None:
        """The Flower strategy's summary."""
        self.flower.summary()

    def train_spec(self, server_round: int) -> ReplySpec:
        """Train metrics (the same keys in every reply, as Flower's aggregation needs) and
        a model like the one sent: its array names, shapes, dtypes, bounded values."""
        del server_round
        template = {key: value.numpy() for key, value in self.arrays.items()}
        return ReplySpec(train_metrics(self.max_examples, required=self.privacy_metrics),
                         {self.flower.arrayrecord_key: like_model(template, self.flower.arrayrecord_key)})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The Flower strategy's train messages to our sample, with our config stamp."""
        nodes = self.sample(grid, self.fraction_train, TRAIN, server_round)
        return list(self.flower.configure_train(server_round, arrays, self.stamp(config, server_round),
                                                SampledGrid(grid, nodes)))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The Flower strategy's aggregation of the replies that pass the screen."""
        screened = self.screen_train(server_round, replies)
        return self.aggregate(server_round, screened.valid), self.train_metrics(screened)

    def aggregate(self, server_round: int, valid: list[Checked]) -> ArrayRecord | None:
        """The Flower strategy's aggregate of checked replies (None if there are none);
        it becomes the global model."""
        # in partition order: the aggregate (Krum's choice among ties, the float sums) does
        # not depend on the order the replies arrived in, so runs and resumes reproduce
        messages = [reply.msg for reply in sorted(valid, key=lambda c: c.partition)]
        for msg in messages:  # what the screen read; Flower's checks expect no other record
            if NOTES in msg.content.config_records:
                del msg.content[NOTES]
        arrays, _ = self.flower.aggregate_train(server_round, messages) if messages else (None, None)
        if arrays is not None:
            # Flower averages integer buffers (BatchNorm's num_batches_tracked) as floats:
            # keep every array's dtype, as the clients' models have it
            dtypes = {name: array.dtype for name, array in self.arrays.items()}
            averaged = {name: array.numpy() for name, array in arrays.items()}
            arrays = ArrayRecord(OrderedDict(
                (name, Array(value.astype(dtypes.get(name, value.dtype), copy=False)))
                for name, value in averaged.items()))
            self.arrays = arrays
        return arrays

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The Flower strategy's evaluate messages to our sample, in evaluation rounds."""
        if not self.evaluates_in(server_round):
            return []
        nodes = self.sample(grid, self.fraction_evaluate, EVALUATE, server_round)
        return list(self.flower.configure_evaluate(server_round, arrays, self.stamp(config, server_round),
                                                   SampledGrid(grid, nodes)))

    # --- the global model, saved state -----------------------------------------------------
    def start_arrays(self) -> ArrayRecord:
        """The global model: the initial one, or the one a resumed run restored."""
        return self.arrays

    def global_model(self) -> dict[str, np.ndarray] | None:
        """The last aggregate (None for FedRep's body)."""
        if not self.keeps_global_model:
            return None
        return {key: value.numpy() for key, value in self.arrays.items()}

    def state_dict(self) -> dict[str, Any]:
        """The sampling state and the global model (names in their order)."""
        names = list(self.arrays.keys())
        return {**super().state_dict(), "array_names": names,
                "arrays": [self.arrays[name].numpy() for name in names]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.arrays = ArrayRecord(OrderedDict(
            (str(name), Array(np.asarray(value)))
            for name, value in zip(state["array_names"], state["arrays"], strict=True)))
