"""Delivery: the scheduler that empties the spool, routing, MX lookup, the SMTP client, Maildir, DSNs.

``Scheduler(config, spool)`` is the entry point; ``relay serve`` runs its
``run()`` as a task beside the listeners and awaits ``stop()`` on shutdown.
"""

from __future__ import annotations

from relay.delivery.scheduler import Scheduler

__all__ = ["Scheduler"]
