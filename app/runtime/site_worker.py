"""A site's long-lived ClientApp worker: deployed rounds at the cost of the work they do.

Flower's SuperNode, in its default ``subprocess`` isolation, starts a new ``flwr-clientapp``
process for every message: Python, Flower, torch and fedsilo are imported again (about 2.4 s
here) and the site's data file is read and validated again, several times per round under
secure aggregation. With ``--isolation process`` the SuperNode leaves launching to an outside
executor, which this module is: one process per site that

- asks the SuperNode's Runtime API for ClientApp tasks (``AcquireTask``, polled every few
  milliseconds, backing off to :data:`MAX_POLL` when idle);
- runs each task **in this process** exactly as ``flwr-clientapp`` would (pull the message and
  context, call the ClientApp, push the reply and the context, heartbeats while it works), with
  the libraries imported once and the site's data cached between messages
  (:func:`app.plan.site_plan`, keyed by the file's size and modification time);
- runs a task only when the run's FAB is this installed fedsilo byte for byte (its FAB hash,
  built as ``flwr run`` builds it, equals the task's). Any other app (another version of fedsilo,
  another Flower app a coordinator submits) gets an error reply naming its hash, and no process:
  nothing of it is installed or run (the site's policy, ``apps: [fedsilo]``, app/site_policy.py).

The site's state still lives where Flower keeps it (the ``Context`` the SuperNode stores and
hands back with every message) and in the site's state folder (:mod:`core.state`): a worker
restart loses nothing but its cache. It exits when its SuperNode does (``--parent-pid``).

    python -m app.runtime.site_worker --runtime-api-address 127.0.0.1:9094 [--parent-pid PID]

Started by :mod:`app.runtime.supernode` (``--worker``), which ``fedsilo deploy local`` and the
deployment tests use.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from app.runtime import appdir

#: AcquireTask polling: right after a task FIRST_POLL, then backing off by BACKOFF to MAX_POLL.
FIRST_POLL, BACKOFF, MAX_POLL = 0.01, 1.5, 0.1
CLIENT_APP_TASK = "flwr-clientapp"

log = logging.getLogger("fedsilo.worker")


def own_fab_hash(app_dir: Path | None = None) -> str:
    """The FAB hash ``flwr run`` gives this app directory (Flower's deterministic FAB build)."""
    import hashlib
    import warnings

    from flwr.cli.build import build_fab_from_disk

    with warnings.catch_warnings():  # pathspec's deprecation notices about Flower's own pattern style
        warnings.simplefilter("ignore", DeprecationWarning)
        return hashlib.sha256(build_fab_from_disk(app_dir or appdir.app_dir())).hexdigest()


def load_client_app(app_dir: Path | None = None) -> Any:
    """The ClientApp the app's ``pyproject.toml`` names (``[tool.flwr.app.components] clientapp``)."""
    import tomllib

    project = tomllib.loads(((app_dir or appdir.app_dir()) / "pyproject.toml").read_text())
    ref = project["tool"]["flwr"]["app"]["components"]["clientapp"]
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


class Worker:
    """Runs the SuperNode's ClientApp tasks; see the module docstring."""

    def __init__(self, address: str) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = address
        self.client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        self.app = load_client_app()
        self.known: dict[str, bool] = {}  # FAB hash -> is this fedsilo
        self.own = ""  # this installation's FAB hash, as last built
        self.in_process = 0
        self.refused = 0

    def matches(self, fab_hash: str) -> bool:
        """Whether a run's FAB is this installed fedsilo (checked once per hash; the source is rebuilt
        each time a new hash appears, so an edit to the installed code is noticed)."""
        if fab_hash not in self.known:
            self.own = own_fab_hash()
            self.known[fab_hash] = bool(fab_hash) and fab_hash == self.own
            if not self.known[fab_hash]:
                log.warning("fedsilo worker: FAB %s is not the installed fedsilo at %s; its tasks are refused "
                            "(the site runs only the installed fedsilo)", fab_hash[:12], appdir.app_dir())
        return self.known[fab_hash]

    def step(self) -> bool:
        """Acquire and run one task; False when there was none."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module

        res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[CLIENT_APP_TASK]))
        if not (res.HasField("task") and res.token):
            return False
        fab_hash = res.task.fab_hash if res.task.HasField("fab_hash") else ""
        if self.matches(fab_hash):
            self.in_process += 1
            t0 = time.monotonic()
            kind = run_task(self.address, res.token, self.app)
            log.info("fedsilo worker: %s message handled in this process in %.3f s (run %d)", kind,
                     time.monotonic() - t0, res.task.run_id)
        else:
            self.refused += 1
            kind = run_task(self.address, res.token, foreign_app_refusal(fab_hash, self.own))
            log.warning("fedsilo worker: refused a message of FAB %s (%s, run %d): the site runs only the installed "
                        "fedsilo", fab_hash[:12], kind, res.task.run_id)
        return True

    def serve(self) -> None:
        """Pull and run messages until the SuperNode stops, backing off while there is nothing to do."""
        wait = FIRST_POLL
        while True:
            if self.step():
                wait = FIRST_POLL
                continue
            time.sleep(wait)
            wait = min(MAX_POLL, wait * BACKOFF)


def foreign_app_refusal(fab_hash: str, own: str) -> Any:
    """A ClientApp stand-in that answers every message of a foreign FAB with an error (nothing of it runs)."""
    from flwr.app import Error, Message

    from core.replies import ReplyError

    def refuse(message: Message, context: Any) -> Message:
        reason = (f"this site runs only the installed fedsilo ({appdir.app_dir().name}, FAB {own[:12]}); "
                  f"the run's app (FAB {fab_hash[:12] or 'unknown'}) is refused by its policy and was not installed")
        return Message(Error(code=int(ReplyError.POLICY), reason=reason), reply_to=message)

    return refuse


def run_task(address: str, token: str, client_app: Any) -> str:
    """One ClientApp task in this process: what ``flwr.supernode.runtime.run_clientapp`` does
    for a task, minus installing the FAB and importing the app (both already here).

    The reply (or an ``Error`` reply when the ClientApp raises), then the task's final status
    and context, are pushed whatever happens; an exception never ends the worker."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, _, _ = pull_task_input(client)
        reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as err:  # noqa: BLE001 - reported to the SuperLink as flwr-clientapp does
        log.error("fedsilo worker: the ClientApp raised %s: %s", type(err).__name__, err, exc_info=err)
        details = f"{type(err)}:<'{err}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as err:  # noqa: BLE001
            log.error("fedsilo worker: pushing the reply failed: %s", err)
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return message.metadata.message_type if message is not None else "unreadable"


def main(argv: list[str] | None = None) -> int:
    """``python -m app.runtime.site_worker``: serve a SuperNode's messages in this process; the exit code."""
    parser = argparse.ArgumentParser(prog="python -m app.runtime.site_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) does")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False  # Flower's logger prints through its own handler: once, not twice
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    from app.support.flower_tuning import fast_object_pulls

    fast_object_pulls()
    worker = Worker(args.runtime_api_address)
    log.info("fedsilo worker: serving ClientApp tasks of %s at %s", appdir.app_dir(), args.runtime_api_address)
    try:
        worker.serve()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
