"""The method's maths in pure numpy: the knowledge market, the codecs of what crosses the
wire (logits and targets), the compressors of the parameter baselines' updates and the
maths of the peers that run mixed fleets (HeteroFL's sub-models, FedProto's prototypes).

Imports neither torch nor flwr (``lint-imports`` checks it), and nothing else of
kta_flwr: every other layer builds on this one. See ``docs/method.md``.
"""
