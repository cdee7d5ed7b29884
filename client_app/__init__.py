"""Flower ClientApp of kta-flwr."""
