"""The ServerApp: run (or resume) the configured strategy (:mod:`kta_flwr.server.run`).

The round as the server sees it: ``docs/method.md``; what a run keeps and how it is
resumed: ``docs/running.md``.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from kta_flwr.server.run import run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of the configured strategy."""
    run(grid, context)
