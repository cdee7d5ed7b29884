"""The one place that turns a :class:`~kta_flwr.config.RunConfig` into components: the
server's Strategy, the market's knobs and the codecs of what crosses the wire.

Both apps call it; nothing else builds these from a config. Torch-free: the shared model
arrives as Flower arrays (``ArrayRecord``) and is read as numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord

from kta_flwr.config import COMMON, COMPRESSED, MARKET, PARAMETERS, PERSONAL, PROTOTYPES, SUBMODELS
from kta_flwr.config import RunConfig
from kta_flwr.flower.strategies.base import MetricsAggregator, NodeOptions, NodeStrategy
from kta_flwr.flower.strategies.common import CommonFedAvg
from kta_flwr.flower.strategies.compressed import CompressedUpdates
from kta_flwr.flower.strategies.heterofl import HeteroFL
from kta_flwr.flower.strategies.market import KnowledgeMarket
from kta_flwr.flower.strategies.prototypes import FedProto
from kta_flwr.flower.strategies.stock import StockStrategy
from kta_flwr.maths.knowledge_codec import Codec
from kta_flwr.maths.market import MarketParams
from kta_flwr.maths.market_kernels import FAST, MarketKernels
from kta_flwr.maths.update_compression import ParamLayout, UpdateCodec

#: Market strategy -> how its teachers are weighted (:class:`~kta_flwr.maths.market.MarketParams`).
MARKET_WEIGHTING = {"kta": "market", "fedmd": "uniform", "ktpfl": "learned"}


def knowledge_codec(cfg: RunConfig) -> Codec:
    """The codec of the logits (up) and targets (down) on the wire."""
    return Codec(cfg.codec, cfg.codec_topk)


def update_codec(cfg: RunConfig, layout: ParamLayout) -> UpdateCodec:
    """The compressor of the shared model's updates under a compressed strategy: Top-k at
    ``topk-fraction``, or SVD from ``svd-energy`` to ``svd-energy-end`` (FedKD)."""
    if cfg.update_compressor == "svd":
        return UpdateCodec(layout, "svd", energy=cfg.svd_energy,
                           energy_end=cfg.svd_energy_end, rounds=cfg.num_server_rounds)
    return UpdateCodec(layout, "topk", fraction=cfg.topk_fraction)


def market_params(cfg: RunConfig) -> MarketParams | None:
    """Market knobs for ``cfg.strategy`` (None for ``local``: no market)."""
    if not cfg.exchanges_knowledge:
        return None
    kta = cfg.strategy == "kta"
    return MarketParams(
        temperature=cfg.temperature,
        divergence=cfg.divergence,
        tau=cfg.similarity_tau,
        neighbours=cfg.neighbours,
        divergence_rows=cfg.divergence_rows,
        background=cfg.background_teacher,
        self_weight=cfg.self_weight,
        accuracy_exponent=cfg.accuracy_exponent,
        target_space=cfg.target_space,
        weighting=MARKET_WEIGHTING[cfg.strategy],
        adaptive=cfg.market == "adaptive",
        # The baselines (FedMD, KT-pFL) mix predictions as published.
        prior_correction=cfg.prior_correction and kta,
        gate=cfg.distill_gate,
        # The defences are kta's (docs/robustness.md); the baselines stay as published.
        consistency=cfg.consistency_check and kta,
        teacher_quality=cfg.teacher_quality if kta else "accuracy",
        sybil_divergence=cfg.sybil_divergence if kta else 0.0,
        loudness_cap=cfg.loudness_cap if kta else 0.0,
        score_uniform_share=cfg.score_uniform_share if kta else 0.0,
        class_quality=cfg.class_quality and kta,
        label_share=cfg.label_share if kta else 0.0,
    )


def _numpy_state(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord of the shared model as ``{name: array}``, in state-dict order."""
    return {name: array.numpy() for name, array in arrays.items()}


def _compressed(cfg: RunConfig, initial_arrays: ArrayRecord, options: NodeOptions) -> NodeStrategy:
    state = _numpy_state(initial_arrays)
    layout = ParamLayout.of(state)
    return CompressedUpdates(
        codec=update_codec(cfg, layout), initial=layout.flatten(state),
        evaluate_global=not cfg.has_private_teacher, label=cfg.strategy,
        aggregation=cfg.update_aggregation, trim_beta=cfg.trim_beta, **options,
    )


def _market(cfg: RunConfig, *, reference_labels: np.ndarray, num_classes: int, fingerprint: str,
            kernels: MarketKernels, options: NodeOptions) -> NodeStrategy:
    return KnowledgeMarket(
        params=market_params(cfg), num_classes=num_classes,
        # the unlabeled mode: the strategy never holds the labels (docs/method.md#the-unlabeled-mode)
        reference_labels=reference_labels if cfg.labeled_reference else None,
        num_reference=len(reference_labels),
        fingerprint=fingerprint, codec=knowledge_codec(cfg),
        reference_fraction=cfg.reference_fraction, holdout_fraction=cfg.holdout,
        max_staleness=cfg.max_staleness, kernels=kernels,
        logit_noise=(cfg.logit_noise, cfg.logit_clip), consensus=bool(cfg.server_model),
        transfer_size=cfg.transfer_size if cfg.transfer_per_round else 0,
        transfer_rows=cfg.transfer_per_round,
        **options,
    )


def _stock(cfg: RunConfig, initial_arrays: ArrayRecord, options: NodeOptions) -> NodeStrategy:
    """Flower's stock strategy of ``cfg.strategy``; FedAvg for the personalization family
    (whose clients keep the personal part)."""
    flower_options = {"fedprox": {"proximal_mu": cfg.proximal_mu},
                      "krum": {"num_malicious_nodes": cfg.krum_malicious},
                      "fedtrimmedavg": {"beta": cfg.trim_beta}}.get(cfg.strategy, {})
    return StockStrategy(
        name="fedavg" if cfg.is_personal else cfg.strategy, initial_arrays=initial_arrays,
        flower_options=flower_options, keeps_global_model=not cfg.shares_body_only, **options,
    )


def node_options(
    cfg: RunConfig, evaluate_metrics_aggr_fn: MetricsAggregator,
    train_metrics_aggr_fn: MetricsAggregator | None = None, max_examples: int | None = None,
    lineage: int | None = None, num_partitions: int = 0,
) -> NodeOptions:
    """The options every strategy takes (sampling, node wait, evaluation schedule, the
    boundary's bounds, metric hooks, lineage, the newcomers' rounds among
    ``num_partitions`` partitions) from ``cfg``."""
    options = NodeOptions(
        evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        train_metrics_aggr_fn=train_metrics_aggr_fn,
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_nodes=cfg.min_nodes, node_wait_timeout=cfg.node_wait_timeout,
        min_round_nodes=cfg.min_round_nodes, seed=cfg.seed,
        privacy_metrics=cfg.privacy_metrics,
        evaluate_every=cfg.evaluate_every, last_round=cfg.num_server_rounds, lineage=lineage,
        round_timeout=cfg.round_timeout, join_round=cfg.join_rounds(num_partitions),
    )
    if max_examples is not None:
        options["max_examples"] = max_examples
    return options


def build_strategy(  # pylint: disable=too-many-arguments
    cfg: RunConfig,
    *,
    initial_arrays: ArrayRecord,
    reference_labels: np.ndarray,
    num_classes: int,
    fingerprint: str,
    options: NodeOptions,
    market_kernels: MarketKernels = FAST,
    tier_shapes: Sequence[Mapping[str, tuple[int, ...]]] = (),
    is_member: Callable[[int], bool] = lambda partition: True,
) -> NodeStrategy:
    """The Strategy for ``cfg.strategy``: the market (kta, fedmd, ktpfl, local), Flower's
    stock strategies (FedAvg under fedavg-ft, ditto and fedrep, whose clients keep the
    personal part), a compressed-update baseline (fedavg-topk, sapef, fedkd) or a peer
    for mixed fleets (heterofl, fedproto, fedavg-common), each
    behind the one interface :class:`~kta_flwr.flower.strategies.base.NodeStrategy`.

    Args:
        initial_arrays: the shared model (or FedRep's body) at its initialisation: what
            the stock strategies send first, the compressed baselines' version 0; the
            market ignores it.
        reference_labels: ``[N_ref]`` labels of the public reference set (market).
        num_classes: C (market).
        fingerprint: hash of the reference set, sent so clients can check their copy.
        options: sampling, evaluation and boundary options (:func:`node_options`).
        market_kernels: the market's heavy computations (the ServerApp passes the torch
            kernels for ``market-device``).
        tier_shapes: HeteroFL: per tier of the fleet, its sub-model's tensor shapes
            (:attr:`~kta_flwr.config.RunConfig.tier_width_rates`).
        is_member: fedavg-common: partition id -> whether it trains the common
            architecture (:meth:`~kta_flwr.config.RunConfig.common_architecture`).
    """
    builders: dict[str, Callable[[], NodeStrategy]] = {
        COMPRESSED: lambda: _compressed(cfg, initial_arrays, options),
        MARKET: lambda: _market(cfg, reference_labels=reference_labels, num_classes=num_classes,
                                fingerprint=fingerprint, kernels=market_kernels, options=options),
        PARAMETERS: lambda: _stock(cfg, initial_arrays, options),
        PERSONAL: lambda: _stock(cfg, initial_arrays, options),
        SUBMODELS: lambda: HeteroFL(initial_arrays=initial_arrays, tier_shapes=tier_shapes,
                                    tier_of=cfg.tier_of_partition, static_batch_norm=cfg.bn_recalibrate,
                                    **options),
        PROTOTYPES: lambda: FedProto(num_classes=num_classes, dim=cfg.prototype_dim, **options),
        COMMON: lambda: CommonFedAvg(initial_arrays=initial_arrays, is_member=is_member, **options),
    }
    return builders[cfg.family]()
