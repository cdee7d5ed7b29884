"""What a node does with a message: one handler per strategy family (:mod:`.market`,
:mod:`.parameters`, :mod:`.compressed`, :mod:`.personal`, :mod:`.prototypes`, :mod:`.common`), over the per-call :class:`~.node.Node`.

The ClientApp (``client_app/app.py``) only dispatches here (:func:`handler_for`). This is
where the torch task meets the Flower records.
"""

from __future__ import annotations

from kta_flwr.client import common, compressed, market, parameters, personal, prototypes
from kta_flwr.client.node import FamilyHandler
from kta_flwr.config import COMMON, COMPRESSED, MARKET, PARAMETERS, PERSONAL, PROTOTYPES, SUBMODELS
from kta_flwr.config import RunConfig

#: Strategy family -> its handler.
HANDLERS: dict[str, FamilyHandler] = {
    MARKET: market.HANDLER,
    PARAMETERS: parameters.HANDLER,
    COMPRESSED: compressed.HANDLER,
    PERSONAL: personal.HANDLER,
    # HeteroFL's client trains the sub-model it is sent, like the stock client (its
    # model is built at the node's width rate, :meth:`~kta_flwr.client.node.Node.fresh_model`)
    SUBMODELS: parameters.HANDLER,
    PROTOTYPES: prototypes.HANDLER,
    COMMON: common.HANDLER,
}


def handler_for(cfg: RunConfig) -> FamilyHandler:
    """The handler of ``cfg.strategy``'s family."""
    return HANDLERS[cfg.family]
