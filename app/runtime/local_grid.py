"""Run fedsilo's real ServerApp and ClientApp in one process, for sweeps and benchmarks.

:class:`LocalGrid` is a Flower ``Grid`` that hands each message straight to the ClientApp
object (``ClientApp(message, context)``, Flower's own entry point) with a persistent
per-node ``Context``, as the simulation engine does, but without a SuperLink, Ray
workers or serialisation. Learning results are identical to the simulation engine's
for the same config and seed (``tests/test_e2e.py`` checks this bit for bit), while a
run costs no start-up: what makes grids of hundreds of runs affordable on two cores.

It is not a substitute for the simulation engine or a deployment where transport,
timing, process isolation or concurrency matter: use ``fedsilo`` for those.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from typing_extensions import override

from app import config
from app.runtime.preflight import preflight
from core.replies import ReplyError

CLIENT_EXCEPTION = int(ReplyError.CLIENT_EXCEPTION)  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class LocalGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process; node ``i`` is partition ``i``."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any], run_id: int = 1,
                 node_config: dict[str, Any] | None = None, workers: int = 1) -> None:
        self.client_app = client_app
        # workers > 1: sites answer concurrently in threads (timing studies: slow sites, buffered rounds)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="site") if workers > 1 else None
        self._futures: dict[str, Future[Message]] = {}
        self.run_id = run_id
        self.contexts = {
            1000 + i: Context(run_id=run_id, node_id=1000 + i,
                              node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                              state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id)

    @override
    def set_run(self, run: Run) -> None:
        self._run = run

    @override
    @property
    def run(self) -> Run:  # type: ignore[override]
        return self._run

    @override
    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    @override
    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        ctx = self.contexts[msg.metadata.dst_node_id]
        try:
            return self.client_app(msg, ctx)
        except Exception as err:  # noqa: BLE001 - an exception becomes an error reply, as in Flower
            return Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    @override
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            key = str(uuid4())
            msg.metadata.__dict__["_message_id"] = key  # as Flower's grids do: replies name it
            if self._pool is not None:
                self._futures[key] = self._pool.submit(self._deliver, msg)
            else:
                self._replies[key] = self._deliver(msg)
            ids.append(key)
        return ids

    @override
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for i in message_ids:
            if i in self._replies:
                out.append(self._replies.pop(i))
            elif i in self._futures and self._futures[i].done():
                out.append(self._futures.pop(i).result())
        return out

    @override
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if self._pool is not None:
            return list(self._pool.map(self._deliver, messages))
        return [self._deliver(msg) for msg in messages]


def run_inprocess(overrides: list[str], out_dir: Path, run_id: int = 1, workers: int = 1,
                  paillier_keys: bool = False) -> dict[str, Any]:
    """Run one fedsilo job in this process; return its ``results.json`` as a dict. ``workers`` > 1:
    that many sites answer at once, in threads (learning results of synchronous rounds unchanged).
    ``paillier_keys`` (with ``aggregation=paillier``): a key pair is made in ``out_dir/keys``, the coordinator gets
    the public key and every site the pair (as a deployment's sites hold it)."""
    from app import client_app, server_app

    node_config: dict[str, Any] = {}
    if paillier_keys and "aggregation=paillier" in overrides:
        from aggregation.paillier import keys

        private, public = keys.generate(out_dir / "keys")
        overrides = [*overrides, f"aggregation.public_key={public}"]
        node_config["paillier-keypair"] = str(private)
    cfg = config.compose(overrides)
    data_dir = preflight(cfg)
    run_config: dict[str, bool | float | int | str] = {"overrides": config.run_overrides(overrides, data_dir),
                                                       "output-dir": str(out_dir)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, run_id
    grid = LocalGrid(client_app.app, config.num_sites(cfg), run_config, run_id, node_config=node_config,
                     workers=workers)
    try:
        server_app.app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                                     run_config=run_config))
    finally:
        if grid._pool is not None:  # work still running when the last round ended (buffered rounds)
            grid._pool.shutdown(wait=True)
    return json.loads((out_dir / "results.json").read_text())
