"""Per-address locks that keep a second relay instance off a listening address.

The workers of one ``relay serve`` or ``relay sink`` bind their listening
sockets with SO_REUSEPORT so that the kernel spreads connections over them.
Linux lets any other process of the same user join such a port, so a second
instance started on the same address would silently take a share of the
connections.  Before its workers bind, each instance therefore binds one
Linux abstract Unix socket named after each listening address and keeps it
open while it runs.  The kernel allows one socket per abstract name, so of
two instances starting at once exactly one gets the name, and the other gets
EADDRINUSE.  ``relay serve`` and ``relay sink`` use the same names, so they
exclude each other too.

Abstract names belong to the network namespace, as ports do, and are not
files.  The kernel frees a name when the last descriptor of its socket
closes, also when the process is killed with SIGKILL, so nothing is left
that could block the next start.  Forked workers inherit the socket, so the
name stays taken until the last process of the instance has exited.

NOTE: a lock covers one exact address.  A wildcard listener (``0.0.0.0:N``)
and a specific one (``127.0.0.1:N``) on the same port take different names,
so only the bind check at start detects that overlap, and only once the
first instance listens.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from relay.units import format_host_port

# Prefix of every lock name.  It is part of the interface between relay
# versions: an instance of an older version that used another prefix would
# not see this one's locks.
LOCK_NAME_PREFIX = "relay listener "


def lock_name(family: int, address: Any) -> str:
    """Return the lock name of a socket address as ``getaddrinfo`` returns it.

    The IPv6 scope ID is part of the name, because ``fe80::1%1`` and
    ``fe80::1%2`` are different addresses.
    """
    host, port = address[0], address[1]
    if family == socket.AF_INET6 and address[3]:
        host = f"{host}%{address[3]}"
    return LOCK_NAME_PREFIX + format_host_port(host, port)


class ListenerLocks:
    """The abstract Unix sockets that hold this instance's listening addresses."""

    def __init__(self) -> None:
        self._sockets: dict[str, socket.socket] = {}

    def acquire(self, family: int, address: Any) -> None:
        """Take the lock of ``address`` unless this instance already holds it.

        Raises OSError with errno EADDRINUSE when another process holds it,
        as a bind to a port in use does, and any other OSError from the bind
        (on a system without abstract Unix sockets, for example).
        """
        name = lock_name(family, address)
        if name in self._sockets:
            return
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A leading NUL byte makes the name abstract: nothing is created on disk.
            lock.bind(b"\0" + name.encode())
        except OSError as exc:
            lock.close()
            if exc.errno == errno.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, f"another relay listens on {name[len(LOCK_NAME_PREFIX):]}") from None
            raise
        self._sockets[name] = lock

    def release(self) -> None:
        """Close every lock socket, which frees its name once no forked process holds it either."""
        for lock in self._sockets.values():
            lock.close()
        self._sockets.clear()

    def __enter__(self) -> ListenerLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
