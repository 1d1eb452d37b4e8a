"""Bytes and messages per round between the server and the sites (``results.json``: ``history[].traffic``).

:class:`MeteredGrid` wraps the ServerApp's Flower ``Grid`` and counts the payload of every
message the strategy sends and every reply it receives, whatever the protocol (FedAvg's
two phases, secure aggregation's four stages, Paillier's ciphertexts). Payload is what
the records carry: array bytes as serialised by Flower, numbers at 8 bytes, strings and
bytes at their length; transport framing (gRPC, TLS) is not included.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from typing_extensions import override

from core.replies import record_bytes


def payload_bytes(content: RecordDict) -> int:
    """Bytes a message's records carry (see the module docstring). Iterates the records directly:
    ``content.array_records`` rebuilds a filtered dict on every access."""
    arrays = sum(len(a.data) for rec in content.values() if isinstance(rec, ArrayRecord) for a in rec.values())
    return arrays + record_bytes(content)


@dataclass
class Traffic:
    """What went each way since the meter was last read."""

    bytes_to_sites: int = 0
    bytes_from_sites: int = 0
    messages_to_sites: int = 0
    replies: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a dict (results.json's traffic)."""
        return dict(self.__dict__)


class MeteredGrid(Grid):
    """A ``Grid`` that forwards everything to ``inner`` and counts the payload both ways."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.traffic = Traffic()

    def take(self) -> Traffic:
        """The traffic since the last call (the ServerApp calls it once per round)."""
        out, self.traffic = self.traffic, Traffic()
        return out

    def _sent(self, messages: list[Message]) -> None:
        self.traffic.messages_to_sites += len(messages)
        self.traffic.bytes_to_sites += sum(payload_bytes(m.content) for m in messages)

    def _received(self, replies: list[Message]) -> None:
        self.traffic.replies += len(replies)
        self.traffic.bytes_from_sites += sum(payload_bytes(m.content) for m in replies if not m.has_error())

    # ---- Grid, forwarded ---------------------------------------------------------------
    @override
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @override
    @property
    def run(self) -> Run:  # type: ignore[override]
        return self.inner.run

    @override
    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    @override
    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    @override
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._sent(messages)
        return self.inner.push_messages(messages)

    @override
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._received(replies)
        return replies

    @override
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._sent(messages)
        if deployed(self.inner):
            replies = poll_replies(self.inner, messages, timeout)
        else:  # the simulation engine's in-memory grid polls fast already; the local grid does not poll
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._received(replies)
        return replies


#: Reply polling of a deployed ServerApp: first look after FIRST_POLL seconds, then back off by
#: BACKOFF to at most MAX_POLL. Flower's ``GrpcGrid.send_and_receive`` sleeps 3 s between pulls,
#: which alone costs about 1.5 s per message exchange (several per secure-aggregation round).
FIRST_POLL, BACKOFF, MAX_POLL = 0.02, 1.5, 0.5


def deployed(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's grid of a deployed ServerApp (talking to a SuperLink over HTTP)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid, HttpGrid)


def poll_replies(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Flower's ``send_and_receive`` (push, then pull until every reply is in or ``timeout``
    passes; replies in the order pulled) with a short, backing-off poll instead of a fixed 3 s."""
    pending = set(grid.push_messages(messages))
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    wait = FIRST_POLL
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or (end is not None and time.monotonic() >= end):
            break
        wait = FIRST_POLL if got else min(MAX_POLL, wait * BACKOFF)
        time.sleep(wait if end is None else max(0.0, min(wait, end - time.monotonic())))
    return replies
