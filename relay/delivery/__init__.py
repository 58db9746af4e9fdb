"""Delivery: the scheduler that empties the spool, routing, MX lookup, the SMTP client, Maildir, DSNs.

``Scheduler(config, spool)`` is the entry point; ``relay serve`` runs its
``run()`` as a task, in the delivery process (``relay.delivery.process``)
when there are several workers and beside the listeners of the only worker
otherwise, and awaits ``stop()`` on shutdown.
"""

from __future__ import annotations

from relay.delivery.scheduler import Scheduler

__all__ = ["Scheduler"]
