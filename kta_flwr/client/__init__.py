"""What a node does with a message: one handler per strategy family (:mod:`.market`,
:mod:`.parameters`, :mod:`.compressed`, :mod:`.personal`), over the per-call :class:`~.node.Node`.

The ClientApp (``client_app/app.py``) only dispatches here (:func:`handler_for`). This is
where the torch task meets the Flower records.
"""

from __future__ import annotations

from kta_flwr.client import compressed, market, parameters, personal
from kta_flwr.client.node import FamilyHandler
from kta_flwr.config import COMPRESSED, MARKET, PARAMETERS, PERSONAL, RunConfig

#: Strategy family -> its handler.
HANDLERS: dict[str, FamilyHandler] = {
    MARKET: market.HANDLER,
    PARAMETERS: parameters.HANDLER,
    COMPRESSED: compressed.HANDLER,
    PERSONAL: personal.HANDLER,
}


def handler_for(cfg: RunConfig) -> FamilyHandler:
    """The handler of ``cfg.strategy``'s family."""
    return HANDLERS[cfg.family]
