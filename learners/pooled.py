"""A learner's program fitted on rows in one process: the pooled reference of the federated fit.

:func:`fit` drives a program (:mod:`core.programs`) with every step answered here: each site's vector
from its site half, summed through the same fixed-point encoding the aggregation options use, and each
decision by the same :meth:`~core.programs.Program.decision`. Given one site holding every row it is
the pooled fit the federated one must equal (``learner=gbdt``: tree for tree,
``tests/integration/test_gbdt.py``); benchmarks use it as the "same trainer on pooled rows".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from core import programs
from core.fixedpoint import Encoding
from core.programs import Ask, Gather, Gathered, Program, SiteCall, Total


def fit(program: Program, sites: list[Any], policy: Any) -> Any:
    """``program`` run over ``sites`` (each a site's data as its task keeps them), in this process."""
    return programs.drive(program, answerer(program, sites, policy))


def answerer(program: Program, sites: list[Any], policy: Any) -> Callable[[Ask | Gather], Total | Gathered]:
    """How each of ``program``'s steps is answered over ``sites`` here (what :func:`fit` drives it with)."""
    task = cast(Any, program).task

    def answer(step: Ask | Gather) -> Total | Gathered:
        if isinstance(step, Gather):
            params = {"what": step.step, **program.state, **step.params, "program": program.name}
            calls = [SiteCall(d, task, params, _no_total, _no_model, policy) for d in sites]
            return Gathered([program.site(step.step, c) for c in calls])
        enc: Encoding = step.encoding
        params = {"what": step.step, "length": step.length, **program.state, **step.params, **enc.to_record(),
                  "program": program.name}
        ints = [0] * step.length
        for d in sites:
            v = np.asarray(program.site(step.step, SiteCall(d, task, params, _no_total, _no_model, policy)))
            ints = enc.add(ints, enc.encode(v))
        total = enc.decode(ints)
        if step.decide:
            return Total(len(sites), np.asarray(type(program).decision(step.step, total, params), dtype=np.float64))
        return Total(len(sites), total)

    return answer


def _no_total(key: str) -> np.ndarray:
    raise KeyError(f"no kept total {key!r} in a pooled fit")


def _no_model(template: dict[str, Any]) -> dict[str, Any]:
    raise KeyError("no model in a pooled fit")


