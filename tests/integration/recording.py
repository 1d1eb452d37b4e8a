"""A local grid that records every message and reply: what a coordinator sent and got, for tests that then
send what a deviating coordinator would."""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregation.paillier.sums import REVEAL_KEY, REVEAL_MESSAGE
from app import client_app
from app.runtime.local_grid import LocalGrid
from core.replies import ReplyError


class Recording(LocalGrid):
    """:class:`~app.runtime.local_grid.LocalGrid` keeping ``(message, reply)`` pairs in :attr:`log`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[Message, Message]] = []

    def _deliver(self, msg: Message) -> Message:
        reply = super()._deliver(msg)
        self.log.append((msg, reply))
        return reply


def ask_reveal(grid: Recording, node: int, rec: dict[str, Any]) -> Message:
    """Send ``node`` a Paillier reveal request ``rec`` as a deviating coordinator would; its reply."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict({REVEAL_KEY: ConfigRecord(rec)}), dst_node_id=node, message_type=REVEAL_MESSAGE)
    return client_app.app(msg, grid.contexts[node])


def assert_refused(reply: Message, why: str) -> None:
    """``reply`` is the site's policy refusal, for the reason ``why``."""
    assert reply.has_error() and reply.error.code == int(ReplyError.POLICY), reply
    assert why in str(reply.error.reason), reply.error.reason
