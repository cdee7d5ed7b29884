"""Strategies on Flower's Message API, every one behind the one interface
:class:`~.base.NodeStrategy` (:mod:`.base`): the knowledge market (:mod:`.market`), the
compressed-update baselines (:mod:`.compressed`) and Flower's stock strategies
(:mod:`.stock`, wrapped); :mod:`.rounds` runs any of them from a given round."""
