"""Open outbound sessions for a route, trying its hosts in order, and keep idle ones for reuse.

Hosts come from the MX lookup (``relay.delivery.dns``) or the route's fixed
next hop.  Each host's addresses are tried in turn until one accepts the
connection, greets with 220 and gets through EHLO, STARTTLS and AUTH.  Of an
MX route, at most ``[delivery] mx_address_limit`` addresses in all are tried
(5, Postfix's ``smtp_mx_address_limit``).

An MX host that resolves to a loopback or unspecified address is this host
(``0.0.0.0`` and ``::`` connect to it as well).  RFC 5321 section 5.1 has a
client drop its own entry and every less preferred one, so that host and
those of the same or a larger preference are left out, as Postfix 3.7 does
for its own addresses.  When that leaves no host, the recipients fail with
``5.4.6`` ("loops back to myself") if this host is the best MX, and are
deferred with ``4.4.4`` if a more preferred MX record exists whose host has
no address (not found, or its lookup failed): this host is then a backup
MX, and the primary may be back later.  Postfix 3.x does the same ("unable
to find primary relay").  Link-local and multicast addresses of
MX hosts are left out as well, as for address literals in
``relay.delivery.router``, so that DNS cannot steer mail at this host or its
neighbours either.  ``[delivery] allow_loopback_mx`` turns this off for test
setups whose MX peers listen on loopback.

An MX host that greets with this relay's own name is this relay as well,
for example behind NAT.  At the best MX host with an address the recipients
fail with ``5.4.6``; at a backup MX host they are deferred with ``4.4.6``,
as Postfix 3.x does.  Either way the less preferred hosts are not tried.

When an opportunistic STARTTLS
handshake fails, the same address is tried once more without STARTTLS, and
the fallback is logged (the ``Outbound STARTTLS failure`` rule: plaintext
only when TLS is not required).

A session that finished a transaction is parked per destination and reused
by the next transaction to that destination; it is closed after
``[delivery] connection_cache_time`` idle seconds (Postfix:
``smtp_connection_cache_time_limit``, 2 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import weakref
from dataclasses import dataclass

from relay import metrics
from relay.delivery.client import (
    DEFAULT_LINE_LENGTH_LIMIT,
    DEFAULT_REPLY_LINE_LIMIT,
    SessionError,
    SessionOptions,
    SMTPSession,
    Timeouts,
)
from relay.delivery.dns import LookupFailure, MailHost, MailHostList, MXResolver
from relay.delivery.router import Route, parse_address
from relay.log import log_event

logger = logging.getLogger("relay.delivery")


@dataclass
class _Parked:
    session: SMTPSession
    closer: asyncio.TimerHandle


class SessionPool:
    """Opens sessions for routes and keeps finished ones for the next message."""

    def __init__(
        self,
        resolver: MXResolver,
        helo_name: str,
        timeouts: Timeouts,
        *,
        ca_file: str = "",
        tls_min_version: str = "TLSv1",
        tls_mandatory_min_version: str = "TLSv1.2",
        cache_time: float = 2.0,
        address_limit: int = 5,
        chunking: bool = True,
        line_length_limit: int = DEFAULT_LINE_LENGTH_LIMIT,
        reply_line_limit: int = DEFAULT_REPLY_LINE_LIMIT,
        mime_downgrade: bool = True,
        allow_loopback_mx: bool = False,
    ) -> None:
        self._resolver = resolver
        self._helo_name = helo_name
        self._timeouts = timeouts
        self._ca_file = ca_file
        self._tls_min_version = tls_min_version
        self._tls_mandatory_min_version = tls_mandatory_min_version
        self._cache_time = cache_time
        self._address_limit = address_limit
        self._chunking = chunking
        self._line_length_limit = line_length_limit
        self._reply_line_limit = reply_line_limit
        self._mime_downgrade = mime_downgrade
        self._allow_loopback_mx = allow_loopback_mx
        self._idle: dict[str, list[_Parked]] = {}
        self._closing: set[asyncio.Task[None]] = set()  # holds QUIT tasks until they finish
        self.opened = 0  # sessions opened so far, for tests and metrics

    async def acquire(self, route: Route) -> SMTPSession:
        """Return an idle session for the route's destination or open a new one.

        Raises LookupFailure when the hosts cannot be found and SessionError
        when none of them could be used; ``SessionError.temporary`` is False
        only when every host refused permanently.
        """
        parked = self._idle.get(route.destination)
        while parked:
            entry = parked.pop()
            entry.closer.cancel()
            if entry.session.idle_intact:
                return entry.session
            # A next hop that closed an idle connection would fail the transaction
            # and defer its recipients for a whole backoff, so a new session opens.
            log_event(logger, "cached_session_closed", logging.DEBUG, relay=entry.session.peer)
            entry.session.abort()
        errors: list[SessionError] = []
        session = await self._open_first(await self._hosts(route), route, errors)
        if session is not None:
            return session
        # A deferral carries a temporary reply (RFC 3463 section 3.1), so a host
        # that failed for good, such as a best MX that loops, yields to one that did not.
        temporary = [error for error in errors if error.temporary]
        last = temporary[-1] if temporary else errors[-1]
        if not temporary and last.loop and route.relayhost:
            # A smart host found by MX lookup that greets with this relay's name is a
            # configuration problem too, so its recipients are deferred (see _hosts).
            raise SessionError(_relayhost_problem(last.reply), peer=last.peer)
        raise SessionError(last.reply, temporary=bool(temporary), peer=last.peer)

    async def open_backup(self, route: Route, tried: str) -> SMTPSession | None:
        """Open a session to the first other MX host, as preferred as ``tried`` or less, that accepts one.

        Returns None when there is none.  For recipients that ``tried``
        deferred: RFC 5321 section 5.1 has a client try the MX hosts in
        order, and Postfix retries a soft failure at the next host.  Each
        lookup shuffles hosts of equal preference anew, so the hosts of
        ``tried``'s preference count as later ones wherever this lookup puts
        them, and one that refused the first connection is tried once more.
        Raises LookupFailure when the hosts cannot be found.
        """
        if not route.use_mx:
            return None
        found = await self._hosts(route)
        preference = next((host.preference for host in found.hosts if host.name == tried), None)
        if preference is None:
            return None
        later = [host for host in found.hosts if host.name != tried and host.preference >= preference]
        return await self._open_first(MailHostList(later, found.best_preference), route, [])

    async def _open_first(
        self, found: MailHostList, route: Route, errors: list[SessionError]
    ) -> SMTPSession | None:
        """Open a session to the first address of ``found.hosts`` that accepts one and add each failure to ``errors``.

        A host less preferred than ``found.best_preference`` is a backup MX
        for the loop check.  No host after one that greets with this relay's
        name is tried, because the hosts after it are as preferred or less.
        """
        options = self._options(route)
        backup_options = dataclasses.replace(options, backup_mx=True)
        for host in found.hosts:
            host_options = backup_options if host.preference > found.best_preference else options
            for address in host.addresses:
                try:
                    session = await self._open(host.name, address, route, host_options)
                except SessionError as exc:
                    log_event(logger, "connect_failed", logging.INFO, relay=f"{host.name}[{address}]:{route.port}",
                              reply=exc.reply)
                    errors.append(exc)
                    if exc.loop:
                        return None
                    continue
                self.opened += 1
                # The gauge follows the session object's life: a closed or aborted
                # session is dropped by every holder and freed at once.
                label = metrics.destination_label(route.destination)
                metrics.destination_active.inc(destination=label)
                weakref.finalize(session, metrics.destination_active.dec, destination=label)
                return session
        return None

    async def _open(self, name: str, address: str, route: Route, options: SessionOptions) -> SMTPSession:
        try:
            return await SMTPSession.open(name, address, route.port, options)
        except SessionError as exc:
            if not (exc.tls_failed and route.tls == "opportunistic"):
                raise
            log_event(logger, "tls_fallback", logging.WARNING, relay=f"{name}[{address}]:{route.port}",
                      reason=exc.reply, action="retrying once without STARTTLS")
            return await SMTPSession.open(name, address, route.port, options, starttls=False)

    def _options(self, route: Route) -> SessionOptions:
        return SessionOptions(
            helo_name=self._helo_name,
            tls=route.tls,
            ca_file=self._ca_file,
            tls_min_version=self._tls_mandatory_min_version if route.tls == "required" else self._tls_min_version,
            username=route.username,
            password=route.password,
            timeouts=self._timeouts,
            chunking=self._chunking,
            line_length_limit=self._line_length_limit,
            reply_line_limit=self._reply_line_limit,
            mime_downgrade=self._mime_downgrade,
            # A fixed next hop (relayhost, transport) is the operator's choice even
            # when it greets with this relay's name; an MX found by lookup is checked.
            mx_domain=route.host if route.use_mx else "",
        )

    async def _hosts(self, route: Route) -> MailHostList:
        """Return the hosts of ``route`` to try, with the preference of the best one for the loop check.

        A lookup of the smart host that fails for good defers the recipients
        with ``4.3.5`` instead of bouncing them, as Postfix does (it logs
        "relayhost configuration problem").  A smart host name that is not
        found or loops back is a configuration error, and bouncing would
        lose every remote message until the operator fixes it.
        """
        try:
            return await self._find_hosts(route)
        except LookupFailure as exc:
            if exc.temporary or not route.relayhost:
                raise
            raise LookupFailure(451, "4.3.5", f"{exc.text} (relayhost configuration problem)") from None

    async def _find_hosts(self, route: Route) -> MailHostList:
        if route.use_mx:
            found = await self._resolver.find_mail_hosts(route.host)
            hosts = found.hosts
            if not self._allow_loopback_mx:
                hosts = _drop_local_addresses(hosts, route.host, found.best_preference)
            hosts = _limit_addresses(hosts, self._address_limit)
            # Postfix 3.x takes the best MX for the loop check from the hosts that have addresses.
            return MailHostList(hosts, hosts[0].preference)
        try:
            ipaddress.ip_address(route.host)
        except ValueError:
            addresses = await self._resolver.host_addresses(route.host)
            return MailHostList([MailHost(route.host, 0, addresses)], 0)
        return MailHostList([MailHost(route.host, 0, (route.host,))], 0)

    def release(self, route: Route, session: SMTPSession) -> None:
        """Park a session after its transaction so the next message to the destination reuses it."""
        if not session.usable:
            session.abort()
            return
        loop = asyncio.get_running_loop()
        parked = self._idle.setdefault(route.destination, [])
        entry = _Parked(session, loop.call_later(self._cache_time, self._expire, route.destination, session))
        parked.append(entry)

    def _expire(self, destination: str, session: SMTPSession) -> None:
        parked = self._idle.get(destination, [])
        self._idle[destination] = [entry for entry in parked if entry.session is not session]
        task = asyncio.get_running_loop().create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every parked session with QUIT."""
        sessions = []
        for parked in self._idle.values():
            for entry in parked:
                entry.closer.cancel()
                sessions.append(entry.session)
        self._idle.clear()
        await asyncio.gather(*(session.close() for session in sessions), return_exceptions=True)


def _relayhost_problem(reply: str) -> str:
    """Return ``reply``, a permanent failure such as ``554 5.4.6 TEXT``, as a ``451 4.3.5`` deferral with its text."""
    text = reply.split(" ", 2)[-1]
    return f"451 4.3.5 {text} (relayhost configuration problem)"


def _drop_local_addresses(hosts: list[MailHost], domain: str, best_preference: int) -> list[MailHost]:
    """Return the MX ``hosts`` without this host, the hosts after it, and link-local or multicast addresses.

    ``best_preference`` is the lowest preference among the domain's MX
    records, those whose hosts have no address included.  Raises
    LookupFailure when this host is the first one: ``5.4.6`` when it is the
    best MX, ``4.4.4`` when a more preferred MX host had no address.  Raises
    ``5.4.4`` when no host has an address left.
    """
    kept: list[MailHost] = []
    for host in hosts:
        addresses = [(text, parse_address(text)) for text in host.addresses]
        local = next((text for text, address in addresses if address.is_loopback or address.is_unspecified), None)
        if local is not None:
            # Hosts of this host's preference come before it only by the shuffle.
            kept = [other for other in kept if other.preference < host.preference]
            if kept:
                break
            if host.preference > best_preference:
                # A better MX host exists but had no address, or only link-local ones:
                # this host is a backup MX, and that host may be reachable later.
                raise LookupFailure(
                    451, "4.4.4", f"cannot find the primary MX host of {domain}: MX host {host.name} has address"
                    f" {local} of this relay, and no more preferred MX host has a usable address",
                )
            raise LookupFailure(
                554, "5.4.6", f"mail for {domain} loops back to myself: MX host {host.name} has address {local}"
            )
        usable = tuple(text for text, address in addresses if not (address.is_link_local or address.is_multicast))
        if usable:
            kept.append(dataclasses.replace(host, addresses=usable))
    if not kept:
        raise LookupFailure(550, "5.4.4", f"no MX host of {domain} has a usable address")
    return kept


def _limit_addresses(hosts: list[MailHost], limit: int) -> list[MailHost]:
    """Return the first ``limit`` addresses of ``hosts`` in order, still grouped by host; 0 keeps them all.

    When those are all of one IP version and a later address is of the
    other, that address takes the last place (Postfix:
    ``smtp_balance_inet_protocols = yes``).  So a relay without a working
    IPv6 route still reaches an MX host over IPv4, and the reverse.
    """
    if limit <= 0:
        return hosts
    listed = [(index, address) for index, host in enumerate(hosts) for address in host.addresses]
    chosen = listed[:limit]
    versions = {parse_address(address).version for _, address in chosen}
    if limit >= 2 and len(versions) == 1:
        other = next((item for item in listed[limit:] if parse_address(item[1]).version not in versions), None)
        if other is not None:
            chosen[-1] = other
    grouped: dict[int, list[str]] = {}
    for index, address in chosen:
        grouped.setdefault(index, []).append(address)
    return [dataclasses.replace(hosts[index], addresses=tuple(addresses)) for index, addresses in grouped.items()]


__all__ = ["LookupFailure", "SessionPool"]
