"""A local grid that records every message and reply: what a coordinator sent and got, for tests that then
send what a deviating coordinator would."""

from __future__ import annotations

from typing import Any

from flwr.app import Message

from app.runtime.local_grid import LocalGrid


class Recording(LocalGrid):
    """:class:`~app.runtime.local_grid.LocalGrid` keeping ``(message, reply)`` pairs in :attr:`log`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[Message, Message]] = []

    def _deliver(self, msg: Message) -> Message:
        reply = super()._deliver(msg)
        self.log.append((msg, reply))
        return reply
