"""The learning task in torch: datasets, the reference/test/train splits and partitions,
tokenization, models and the two training stages.

Imports no Flower runtime (``flwr``; flwr-datasets' partitioners are used), so it runs
and tests without a SuperLink. See ``docs/method.md`` and ``docs/configuration.md``.
"""
