"""The round loop, able to start at any round: what makes checkpoint and resume possible.

Flower's ``Strategy.start`` always begins at round 1. :func:`run_rounds` is the same
loop (configure_train, send, aggregate_train, configure_evaluate, send,
aggregate_evaluate, server-side evaluation), run for rounds ``first_round..num_rounds``
on top of a :class:`~flwr.serverapp.strategy.Result` carried over from earlier rounds,
with a hook called after every completed round (where the ServerApp writes its
checkpoint). It drives any Message-API strategy, Flower's own included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
AfterRound = Callable[[int, ArrayRecord, Result], None]


def run_rounds(  # noqa: PLR0913 - mirrors Strategy.start's parameters
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    first_round: int = 1,
    result: Result | None = None,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: EvaluateFn | None = None,
    after_round: AfterRound | None = None,
) -> Result:
    """Run rounds ``first_round..num_rounds`` from the global model ``arrays``.

    With ``first_round == 1`` and no ``result`` this is ``strategy.start`` (the initial
    model is evaluated as round 0). Resuming, ``arrays`` is the model after round
    ``first_round - 1`` and ``result`` what the earlier rounds produced; it is extended
    in place and returned. ``after_round(r, arrays, result)`` runs after each round.
    """
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    if result is None:
        result = Result()
    if first_round == 1:  # the initial model is round 0
        score(0, arrays, result, evaluate_fn)
    t_start = time.time()
    for rnd in range(first_round, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
        replies = grid.send_and_receive(messages=strategy.configure_train(rnd, arrays, train_config, grid),
                                        timeout=timeout)
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            result.arrays = arrays = new_arrays
        if train_metrics is not None:
            result.train_metrics_clientapp[rnd] = train_metrics
        replies = grid.send_and_receive(messages=strategy.configure_evaluate(rnd, arrays, evaluate_config, grid),
                                        timeout=timeout)
        eval_metrics = strategy.aggregate_evaluate(rnd, replies)
        if eval_metrics is not None:
            result.evaluate_metrics_clientapp[rnd] = eval_metrics
        score(rnd, arrays, result, evaluate_fn, after_round)
    log(INFO, "Rounds %s..%s finished in %.2fs", first_round, num_rounds, time.time() - t_start)
    return result


def score(rnd: int, arrays: ArrayRecord, result: Result, evaluate_fn: EvaluateFn | None,
          after_round: AfterRound | None = None) -> None:
    """The end of a round (or of model version ``rnd``): the server-side evaluation into ``result``,
    then ``after_round``. Shared by synchronous and buffered rounds."""
    if evaluate_fn is not None:
        res = evaluate_fn(rnd, arrays)
        if res is not None:
            result.evaluate_metrics_serverapp[rnd] = res
    if after_round is not None:
        after_round(rnd, arrays, result)
