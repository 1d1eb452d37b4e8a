"""Typed lookups in a ``RecordDict`` without Flower's filtered views.

``RecordDict.config_records`` (and ``array_records``, ``metric_records``) builds a new
filtered dict on every access and re-inserts every record of the ``RecordDict`` into it,
type-checking each one: a cost proportional to the records held, paid on each lookup. A
site's ``context.state`` holds a dozen records, and the protocol stages read it several
times per message, at every site and round. These helpers read the one record asked for.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)


def _typed(content: RecordDict, key: str, kind: type[R]) -> R | None:
    rec = content.get(key)
    return rec if isinstance(rec, kind) else None


def config(content: RecordDict, key: str) -> ConfigRecord | None:
    """The ``ConfigRecord`` under ``key``, or None (absent, or a record of another type)."""
    return _typed(content, key, ConfigRecord)


def arrays(content: RecordDict, key: str) -> ArrayRecord | None:
    """The ``ArrayRecord`` under ``key``, or None (absent, or a record of another type)."""
    return _typed(content, key, ArrayRecord)


def metrics(content: RecordDict, key: str) -> MetricRecord | None:
    """The ``MetricRecord`` under ``key``, or None (absent, or a record of another type)."""
    return _typed(content, key, MetricRecord)


__all__ = ["arrays", "config", "metrics"]
