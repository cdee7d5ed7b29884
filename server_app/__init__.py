"""Flower ServerApp of kta-flwr."""
