"""``python -m app.runtime.supernode [--worker] FLOWER-SUPERNODE-FLAGS``: Flower's SuperNode, run fast.

It runs Flower's own ``flower-supernode`` (same flags, same TLS, node authentication, node
config and Fleet API), with two changes that make a deployed round cost close to its work:

1. **Idle polling.** Flower's SuperNode sleeps 3 s whenever the SuperLink has no message for
   it and 0.5 s between looks for a finished reply (``flwr.supernode.start_client_internal``;
   neither is configurable in Flower 1.41/1.42). A round of secure aggregation is several
   message exchanges, and each waits out most of those 3 s because the next stage's message
   arrives just after the SuperNode found nothing. Here the idle wait starts at 20 ms after each
   message the node handled and backs off to ``FEDSILO_SUPERNODE_POLL`` seconds (default
   :data:`DEFAULT_POLL`), so an idle node costs the SuperLink about one TLS request a second.
   Object pulls retry after 20 ms, not 1 s (:mod:`app.support.flower_tuning`).
2. **``--worker``**: the SuperNode runs with ``--isolation process`` and this launcher starts
   the site's long-lived ClientApp worker (:mod:`app.runtime.site_worker`) on the SuperNode's
   Runtime API port, in the same process group (``killpg`` stops both); the worker exits with
   the SuperNode. Without ``--worker`` the SuperNode keeps Flower's default isolation (a new
   ``flwr-clientapp`` process per message).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time as _time
from types import ModuleType

from app.support.flower_tuning import fast_object_pulls

DEFAULT_POLL = 1.0
#: Flower's idle sleep (seconds) in ``start_client_internal``; the first idle wait after a message; growth.
IDLE_SLEEP, FIRST_IDLE, BACKOFF = 3.0, 0.02, 1.3
POLL_ENV = "FEDSILO_SUPERNODE_POLL"


class _CappedSleep(ModuleType):
    """The ``time`` module as :mod:`flwr.supernode.start_client_internal` sees it: ``sleep`` capped.

    Flower's idle sleep (3 s after an empty pull) becomes a backing-off one: :data:`FIRST_IDLE`
    seconds right after the SuperNode handled a message (when the next stage's message is most
    likely), growing by :data:`BACKOFF` per empty pull up to ``cap``. Shorter waits (Flower's 0.5 s
    looks for a finished reply) are capped at :data:`FIRST_IDLE`."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap
        self.idle = FIRST_IDLE
        self.last_was_idle = False

    def __getattr__(self, name: str) -> object:
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        if seconds < IDLE_SLEEP:  # waiting for the ClientApp's reply: a message is being handled
            self.last_was_idle = False
            _time.sleep(min(seconds, FIRST_IDLE))
            return
        self.idle = min(self.cap, self.idle * BACKOFF) if self.last_was_idle else FIRST_IDLE
        self.last_was_idle = True
        _time.sleep(min(seconds, self.idle))


def poll_interval() -> float:
    """Seconds between the SuperNode's polls when idle (``FEDSILO_SUPERNODE_POLL``, else the default)."""
    raw = os.environ.get(POLL_ENV, str(DEFAULT_POLL))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.01 <= value <= 3.0:
        raise SystemExit(f"{POLL_ENV}={raw!r}: must be a number of seconds between 0.01 and 3")
    return value


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _drop(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == name:
            skip = i + 1 < len(argv)
            continue
        if not arg.startswith(name + "="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    """Start Flower's SuperNode (``--worker``: with fedsilo's site worker as its app process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    worker = "--worker" in argv
    argv = [a for a in argv if a != "--worker"]
    cap = poll_interval()
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal.time = _CappedSleep(cap)  # type: ignore[attr-defined]
    fast_object_pulls()
    if worker:
        if _flag(argv, "--isolation") not in (None, "process"):
            raise SystemExit("--worker runs the ClientApps itself: leave --isolation out")
        argv = _drop(argv, "--isolation") + ["--isolation", "process"]
        port = _flag(argv, "--port")
        if port is None:
            from app.runtime.superlink import free_port

            port = str(free_port())
            argv += ["--port", port]
        subprocess.Popen([sys.executable, "-m", "app.runtime.site_worker", "--runtime-api-address",
                          f"127.0.0.1:{port}", "--parent-pid", str(os.getpid())])
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
