"""Lease owner names for schedulers, and whether the process behind one is still alive.

A scheduler claims recipients under the owner name ``HOST:PID:START:N``,
where START identifies the process's start: the first 8 hex digits of the
kernel's boot ID and the start time in clock ticks since boot
(``/proc/PID/stat`` field 22).  PID alone is not enough, because the kernel
reuses PIDs.  N counts the schedulers created in the process, so each one
can release its own leases when it stops.

After a crash (kill -9, OOM kill) the dead scheduler's leases would hold its
recipients for ``spool.lease_time``.  A starting scheduler therefore checks each owner
holding leases with ``owner_is_dead`` and releases the leases of dead ones.
The answer is "dead" only for an owner on this host whose PID runs no
process (a zombie, killed but not yet reaped, counts as none), or runs one
that started at another time.  Owners on other
hosts sharing the spool, and names in another format, are never judged dead:
their leases run out by themselves.

Without ``/proc`` (not Linux) START is empty and only the PID is checked,
so a reused PID keeps a dead owner's leases until they run out.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

_PROC = Path("/proc")
_instances = itertools.count(1)


def _boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """Return the start identity of process ``pid``, "" when /proc is missing, None when no such process runs.

    A zombie runs nothing, so it gives None too.
    """
    if not _PROC.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces, so
    # count fields from the last ")"; state is field 3, start time field 22.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        # Killed and not yet reaped (zombie) or being removed: it runs no scheduler.
        return None
    return f"{_boot_id()}-{fields[19]}"


def scheduler_owner() -> str:
    """Return a new lease owner name in this process: ``HOST:PID:START:N``."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start(pid) or ''}:{next(_instances)}"


def owner_is_dead(owner: str) -> bool:
    """Return whether ``owner`` names a scheduler process on this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text, _, rest = rest.partition(":")
    start, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    current = process_start(int(pid_text))
    if current is None:
        return True
    return bool(start) and bool(current) and current != start
