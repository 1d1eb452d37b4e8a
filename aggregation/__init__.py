"""Aggregation options: *how* a round's weighted sum reaches the coordinator.

``aggregation=plain|secagg|paillier``, each an :class:`~aggregation.base.AggregationOption`
with a coordinator half (a Strategy wrapping any strategy) and a site half. A new option is
a package here with an ``option.py``, one line in :data:`REGISTRY` and its docs.
"""

from __future__ import annotations

from aggregation.base import AggregationConfig, AggregationOption
from aggregation.paillier.option import Paillier
from aggregation.plain import Plain
from aggregation.secagg.option import SecAgg

REGISTRY: dict[str, AggregationOption] = {o.name: o for o in (Plain(), SecAgg(), Paillier())}


def get(name: str) -> AggregationOption:
    """The option registered under ``name``; ValueError naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"aggregation.name={name!r} is not one of {sorted(REGISTRY)}") from None


def train_names() -> list[str]:
    """Every ``train.<name>`` message some option's site half answers."""
    return sorted({n for o in REGISTRY.values() for n in o.train_names})


def query_names() -> list[str]:
    """Every ``query.<name>`` protocol message some option's site half answers."""
    return sorted({n for o in REGISTRY.values() for n in o.queries})


def sum_names() -> list[str]:
    """Every ``query.<name>`` message some option's site half answers with its share of a sum."""
    return sorted({o.sum_message for o in REGISTRY.values()})


__all__ = ["REGISTRY", "AggregationConfig", "AggregationOption", "get", "query_names", "sum_names", "train_names"]
