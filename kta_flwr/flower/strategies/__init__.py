"""Strategies on Flower's Message API: the knowledge market (:mod:`.market`), the
compressed-update baselines (:mod:`.compressed`), their shared base (:mod:`.base`) and
Flower's stock FedAvg/FedProx with evaluation every few rounds (:mod:`.stock`)."""
