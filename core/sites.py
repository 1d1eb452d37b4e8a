"""Who a reply comes from: the site record every reply carries, and labels for logs.

A site names itself in every reply (ConfigRecord :data:`SITE_KEY`: its id in the
federation, its name, the round); the coordinator knows the node a message came from.
:class:`SiteId` holds both, :class:`SiteDirectory` remembers node -> name for sites that
later fail or leave, and nothing parses display strings back into names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message

from core import recordview

WEIGHT_KEY = "num-examples"
SITE_KEY = "site"


@dataclass(frozen=True)
class SiteId:
    """A site as the coordinator knows it: its node, and once it has replied, its name and id."""

    node: int
    name: str | None = None
    index: int | None = None  # the site's id in the federation (partition id), as it reports it

    @property
    def label(self) -> str:
        """``site-name (node N)`` once the name is known, else ``node N`` (logs, results.json)."""
        return f"{self.name} (node {self.node})" if self.name is not None else f"node {self.node}"

    def __str__(self) -> str:
        return self.label


def site_record(msg: Message) -> ConfigRecord | None:
    """The reply's ``site`` ConfigRecord, or None (:mod:`core.recordview`: ``content.config_records``
    rebuilds a filtered dict on every access, a cost per reply at hundreds of sites)."""
    return None if msg.has_error() else recordview.config(msg.content, SITE_KEY)


def site_of(msg: Message) -> SiteId:
    """The :class:`SiteId` a reply names (its node only, for error replies)."""
    rec = site_record(msg)
    node = msg.metadata.src_node_id
    if rec is None:
        return SiteId(node)
    return SiteId(node, str(rec.get("name", "?")), int(rec["id"]) if "id" in rec else None)


def site_label(msg: Message) -> str:
    """``site-name (node N)`` for logs; falls back to the node id."""
    return site_of(msg).label


def site_order(msg: Message) -> int:
    """Sort key giving a fixed aggregation order, hence bit-identical runs for one seed."""
    rec = site_record(msg)
    return int(rec["id"]) if rec is not None and "id" in rec else msg.metadata.src_node_id


def site_record_for(index: int, name: str, server_round: int, straggler: bool = False) -> ConfigRecord:
    """The ``site`` record a site puts in its replies."""
    return ConfigRecord({"id": index, "name": name, "round": server_round, "straggler": straggler})


def stragglers(replies: list[Message]) -> list[str]:
    """Labels of the sites whose reply says they finished only part of their work."""
    return [site_label(m) for m in replies if bool((site_record(m) or {}).get("straggler", False))]


@dataclass
class SiteDirectory:
    """Node id -> site name, learned from replies; names nodes that failed or left later."""

    names: dict[int, str] = field(default_factory=dict)

    def learn(self, replies: list[Message]) -> None:
        """Learn each replying node's site name from its site record."""
        for m in replies:
            rec = site_record(m)
            if rec is not None:
                self.names[m.metadata.src_node_id] = str(rec.get("name", "?"))

    def site(self, node: int) -> SiteId:
        """The site of ``node`` (its name if learnt)."""
        return SiteId(node, self.names.get(node))

    def label(self, node: int) -> str:
        """The label of ``node``'s site in logs and results (its name, else its node id)."""
        return self.site(node).label

    def names_by_label(self) -> dict[str, str]:
        """Each known site's reply label -> its name (so that no one parses labels)."""
        return {SiteId(node, name).label: name for node, name in self.names.items()}
