"""Developer tools: run-config presets, the local federation launcher and its CLI
(``deploy``), TLS credentials, the compose topology, the benchmarks (``bench``,
``efficiency``, ``compare``) and their plots.

Run from a checkout (they find ``configs/`` and ``docker/`` from :mod:`.paths`); the
apps and the library never import them (``lint-imports`` checks it). See
``docs/running.md`` and ``docs/benchmarks.md``.
"""
