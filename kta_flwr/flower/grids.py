"""Views of Flower's ``Grid``: a delegating base (:class:`GridView`), a grid restricted to
the nodes a strategy sampled (:class:`SampledGrid`), and the attribution of the
SuperLink's "node unavailable" answers to the node that was lost (:func:`attribute_lost`).

When a node dies, the SuperLink answers each instruction sent to it with an error
message of its own (sender: the SuperLink, ``SUPERLINK_NODE_ID``). Left as it is, that
answer reads as a reply from a node that was never asked, is dropped as such, and the
lost node's failure is counted twice (once as an error, once as a rejected reply).
:func:`attribute_lost` turns it into the lost node's error reply, so it is counted once
and the node is named.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid


class GridView(Grid):
    """A ``Grid`` that passes every call to ``inner`` (subclasses change some)."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner

    def set_run(self, run: Any) -> None:  # noqa: D102
        self._inner.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102
        return self._inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self._inner.pull_messages(message_ids)

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._inner.send_and_receive(messages, timeout=timeout)


class SampledGrid(GridView):
    """``inner`` with ``get_node_ids`` fixed to ``nodes``: what a Flower stock strategy
    sees, so that it addresses exactly the nodes our sampler chose."""

    def __init__(self, inner: Grid, nodes: Iterable[int]) -> None:
        super().__init__(inner)
        self.nodes = list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        """The sampled nodes."""
        return list(self.nodes)


def attribute_lost(sent: Iterable[Message], replies: Iterable[Message]) -> list[Message]:
    """``replies`` with each SuperLink-made error answer to one of ``sent`` (the node was
    unavailable) replaced by the same error as a reply from the node it was sent to."""
    by_id = {msg.metadata.message_id: msg for msg in sent}
    out = []
    for reply in replies:
        instruction = by_id.get(reply.metadata.reply_to_message_id)
        if (reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID
                and instruction is not None
                and instruction.metadata.dst_node_id != SUPERLINK_NODE_ID):
            reply = Message(reply.error, reply_to=instruction)
        out.append(reply)
    return out
