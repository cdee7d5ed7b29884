"""kta-flwr: a prediction-space knowledge market (KTA v2) for personalized FL on Flower."""

__version__ = "0.1.0"
