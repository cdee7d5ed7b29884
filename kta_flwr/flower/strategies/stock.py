"""Flower's stock FedAvg and FedProx, unchanged but for evaluation every few rounds."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx

from kta_flwr.flower.strategies.base import EvaluateEvery


class FedAvgEvery(EvaluateEvery, FedAvg):
    """Flower's FedAvg with :class:`~kta_flwr.flower.strategies.base.EvaluateEvery`."""


class FedProxEvery(EvaluateEvery, FedProx):
    """Flower's FedProx with :class:`~kta_flwr.flower.strategies.base.EvaluateEvery`."""
