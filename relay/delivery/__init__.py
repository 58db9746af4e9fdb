"""Delivery: the scheduler that empties the spool, routing, MX lookup, the SMTP client, Maildir, DSNs.

``Scheduler(config, spool)`` is the entry point; ``relay serve`` runs its
``run()`` as a task, in the delivery process (``relay.delivery.process``)
when there are several workers and beside the listeners of the only worker
otherwise, and awaits ``stop()`` on shutdown.  ``Scheduler`` is imported on
first use, so that ``relay sendmail`` and the RCPT check, which need only
``relay.delivery.maildir``, do not load the scheduler, the SMTP client and
dnspython.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.delivery.scheduler import Scheduler

__all__ = ["Scheduler"]


def __getattr__(name: str) -> Any:
    if name == "Scheduler":
        from relay.delivery.scheduler import Scheduler

        return Scheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
