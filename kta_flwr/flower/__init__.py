"""The Flower layer: strategies on the Message API, the wire protocol, model sync for the
compressed baselines, byte metering, per-round results and client phase timing.

Imports no torch: the server side runs the market in numpy. See ``docs/method.md``.
"""
