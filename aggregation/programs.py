"""Protected-sum programs (:mod:`core.programs`) under the run's aggregation option: both halves.

Coordinator half, :class:`ProgramRunner`: drives a program's steps. An :class:`~core.programs.Ask`
becomes a sum request (:data:`~aggregation.base.SUM_REQUEST`: the sum's id, the step, its length
and encoding, the program's name and state, the step's parameters; the model, if the step sends
one) that the option's :class:`~aggregation.base.SumCoordinator` collects (plain: every site's
vector; secagg: only the total; Paillier: a total the sites can open). A kept total goes into the
program's state, sealed where the coordinator may not read it; a revealed one is asked of a key
holder where only the sites can open it (Paillier reveals test metrics only). A
:class:`~core.programs.Gather` is one message per site, answered in the clear.

Site half, :func:`site_answer`: the request names the program, the site looks it up in *its own*
registry (a program the site does not have is refused: the coordinator sends data, never code),
opens the totals it needs through the option's site half and replies with the option's
:meth:`~aggregation.base.SiteHalf.sum_reply`. The vector is checked against the request's length
before it leaves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from logging import WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from aggregation.base import (
    SUM_REQUEST,
    RevealFailed,
    SiteEnv,
    SiteHalf,
    SumCoordinator,
    SumResult,
    screen_sum_replies,
)
from core import programs
from core.programs import Ask, Gather, Gathered, PolicyRefusal, Program, ProgramError, SiteCall, Total

#: the message of a :class:`~core.programs.Gather` step, and the record of its reply
GATHER_MESSAGE = "query.fedsilo_gather"
GATHER_KEY = "fedsilo-gather"


class ProgramRunner:
    """Runs programs against the federation's ``nodes`` with the option's sum coordinator."""

    def __init__(self, summer: SumCoordinator, grid: Grid, nodes: list[int]) -> None:
        self.summer, self.grid, self.nodes = summer, grid, nodes
        self.sum_id = 0  # numbers every sum of the run (Paillier binds contributions to it)

    def run(self, program: Program, on_progress: Callable[[dict[str, Any]], None] | None = None) -> Any:
        """``program``'s outcome, each of its steps answered under the option; ``on_progress`` is called with
        each new resumable point the program reaches (:attr:`~core.programs.Program.progress`)."""
        seen: list[Any] = [program.progress]

        def report() -> None:  # a resumable point the program reached since the last step
            if on_progress is not None and program.progress is not seen[0] and program.progress is not None:
                seen[0] = program.progress
                on_progress(program.progress)

        def answer(step: Ask | Gather) -> Total | Gathered:
            report()
            return self._answer(program, step)

        outcome = programs.drive(program, answer)
        report()
        return outcome

    def request(self, program: Program, step: Ask) -> RecordDict:
        """The sum request of ``step`` (a new sum id)."""
        self.sum_id += 1
        rec = ConfigRecord({"id": self.sum_id, "what": step.step, "length": step.length, **program.state,
                            **step.params, **step.encoding.to_record(), "program": program.name})
        content = RecordDict({SUM_REQUEST: rec})
        if step.arrays is not None:
            content["arrays"] = step.arrays
        return content

    def _answer(self, program: Program, step: Ask | Gather) -> Total | Gathered:
        if isinstance(step, Gather):
            return self._gather(program, step)
        content = self.request(program, step)
        result = self.summer.collect(self.grid, self.nodes, content, step.length, self.sum_id)
        if step.keep is not None:
            kept = ConfigRecord()
            result.put(kept, step.keep)
            program.state.update(dict(kept.items()))
        values = result.values
        if step.decide:
            return Total(result.sites, self._decide(program, step, result, content), list(result.rejected))
        if step.reveal and result.sites > 0:
            try:
                values = self.summer.reveal(self.grid, self.nodes, result)
            except RevealFailed as err:  # e.g. a listed site's contribution is missing: no total this time
                log(WARNING, "fedsilo %s (%s): total not revealed: %s", program.name, step.step, err)
                values = None
        return Total(result.sites, values, list(result.rejected))

    def _decide(self, program: Program, step: Ask, result: SumResult, content: RecordDict) -> np.ndarray | None:
        """The program's decision of the total: computed here where the total is readable, else by a key
        holder from the total it verifies (None, with a warning, if none would)."""
        if result.sites == 0:
            return None
        if result.values is not None:
            return np.asarray(type(program).decision(step.step, result.values, dict(content[SUM_REQUEST].items())),
                              dtype=np.float64)
        try:
            return self.summer.decide(self.grid, self.nodes, result, content)
        except RevealFailed as err:
            log(WARNING, "fedsilo %s (%s): no site decided the total: %s", program.name, step.step, err)
            return None

    def _gather(self, program: Program, step: Gather) -> Gathered:
        rec = ConfigRecord({"what": step.step, **program.state, **step.params, "program": program.name})
        replies = self.summer.send(self.grid, self.nodes, RecordDict({SUM_REQUEST: rec}), GATHER_MESSAGE)

        def check(msg: Message) -> str | None:
            got = msg.content.config_records.get(GATHER_KEY)
            return None if got is not None and isinstance(got.get("value"), str) else f"reply has no {GATHER_KEY!r} text"

        good, rejected = screen_sum_replies(replies, self.nodes, check)
        return Gathered([cast(str, m.content.config_records[GATHER_KEY]["value"]) for m in good.values()], rejected)


#: the ``context.state`` record counting the program steps a site answered in a run
COUNT_KEY = "fedsilo-program-steps"


def count_request(context: Context, policy: Any) -> None:
    """Count one more program step of this run; :class:`~core.programs.PolicyRefusal` past the site policy's
    ``statistics.max_sums`` (how often a coordinator may ask: every answer is a release)."""
    rec = context.state.config_records.get(COUNT_KEY)
    answered = int(rec["steps"]) if rec is not None and isinstance(rec.get("steps"), int) else 0  # type: ignore[arg-type]
    limit = int(policy.statistics.max_sums)
    if answered >= limit:
        raise PolicyRefusal(f"this run asked for more than the policy's statistics.max_sums={limit} protected-sum "
                            "steps of this site")
    context.state[COUNT_KEY] = ConfigRecord({"steps": answered + 1})


def site_answer(msg: Message, context: Context, half: SiteHalf, env: SiteEnv, data: Any, task: Any,
                policy: Any) -> Message:
    """The site's answer to a program's request: its value (gather) or its share of the sum.

    Raises :class:`~core.programs.ProgramError` (unknown program or step, a vector of the wrong
    length), :class:`~core.programs.PolicyRefusal` or the site's data errors; the caller turns them
    into refusals."""
    rec = msg.content.config_records.get(SUM_REQUEST)
    if rec is None:
        raise ProgramError(f"a program request without its {SUM_REQUEST!r} record")
    program = programs.get(str(rec.get("program", "")))
    count_request(context, policy)
    call = SiteCall(data, task, dict(rec.items()), lambda key: half.open_total(context, rec, key),
                    lambda template: half.global_state(msg, context, template), policy)
    step = str(rec.get("what", ""))
    if msg.metadata.message_type == GATHER_MESSAGE:
        value = program.site(step, call)
        if not isinstance(value, str):
            raise ProgramError(f"{program.name} ({step}): a gathered value must be text (JSON)")
        json.loads(value)  # malformed JSON never leaves the site
        return Message(RecordDict({GATHER_KEY: ConfigRecord({"value": value})}), reply_to=msg)
    values = np.asarray(program.site(step, call), dtype=np.float64)
    length = rec.get("length")
    if values.ndim != 1 or not isinstance(length, int) or values.shape[0] != length:
        raise ProgramError(f"{program.name} ({step}): the site's vector has shape {values.shape}, the request asks "
                           f"for {length!r} values")
    return half.sum_reply(msg, context, values, env)
