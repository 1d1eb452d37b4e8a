"""Flower's waits, tuned for rounds that take seconds (deployment only; nothing else changes).

Flower retries an object it cannot pull yet (a message whose content is still being pushed)
after 1 s, doubling to 10 s (``flwr.supercore.inflatable.inflatable_utils.pull_objects``:
``PULL_INITIAL_BACKOFF``). Every message exchange of a deployed round meets this at least once
(the SuperNode pulls from the SuperLink while the ServerApp is still pushing; the ClientApp pulls
from the SuperNode while the SuperNode is still pulling; the ServerApp pulls a reply while the
SuperNode is still pushing it), so a round of secure aggregation waits seconds for nothing.
:func:`fast_object_pulls` starts that backoff at :data:`FIRST_BACKOFF` seconds instead; the cap,
the number of tries and the overall time limit stay Flower's. It is applied by the processes
fedsilo starts or runs in: the SuperNode launcher (:mod:`app.runtime.supernode`), the site worker
(:mod:`app.runtime.site_worker`) and the ServerApp (:mod:`app.server_app`).
"""

from __future__ import annotations

FIRST_BACKOFF = 0.02


def fast_object_pulls(first: float = FIRST_BACKOFF) -> None:
    """Start Flower's object-pull retry backoff at ``first`` seconds in this process."""
    from flwr.supercore.inflatable import inflatable_utils

    for fn in vars(inflatable_utils).values():  # pull_objects and pull_and_inflate_object_from_tree
        defaults = getattr(fn, "__kwdefaults__", None)
        if getattr(fn, "__module__", "") == inflatable_utils.__name__ and defaults and "initial_backoff" in defaults:
            defaults["initial_backoff"] = first
