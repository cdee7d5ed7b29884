"""Flower's stock FedAvg and FedProx, unchanged but for evaluation every few rounds and
waiting for nodes with a deadline."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx

from kta_flwr.flower.strategies.base import EvaluateEvery, NodeWait


class FedAvgEvery(EvaluateEvery, NodeWait, FedAvg):
    """Flower's FedAvg with :class:`~kta_flwr.flower.strategies.base.EvaluateEvery` and
    :class:`~kta_flwr.flower.strategies.base.NodeWait`."""


class FedProxEvery(EvaluateEvery, NodeWait, FedProx):
    """Flower's FedProx with :class:`~kta_flwr.flower.strategies.base.EvaluateEvery` and
    :class:`~kta_flwr.flower.strategies.base.NodeWait`."""
