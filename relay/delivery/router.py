"""Choose how each recipient is delivered: local Maildir, a fixed next hop, or MX.

Order (first match wins): a domain in ``[policy] local_domains``, and an
address without a domain (``<postmaster>``, which RFC 5321 section 4.5.1
makes every SMTP server accept for its own postmaster), goes to the local
Maildir; a domain in ``[delivery.transport]`` goes where its entry says
(``"local"`` or ``"smtp:[host]:port"``); when ``[delivery] relayhost`` is set
every other domain goes to that smart host; otherwise the domain's MX hosts
on ``[delivery] smtp_port``.  An address literal (``user@[192.0.2.30]``,
RFC 5321 section 4.1.3) goes to the smart host when ``relayhost`` is set,
like any other remote domain, and otherwise straight to that address with
no MX lookup.  A literal for which ``is_internal_address`` holds (loopback,
link-local, multicast, unspecified or reserved, also in IPv4-mapped IPv6
form such as ``[IPv6:::ffff:127.0.0.1]``) fails with ``5.7.1`` either way,
so that mail cannot be steered at this host or its neighbours.  RCPT
rejects these literals already, but a bounce goes to the reverse-path,
which RCPT never checked.

A ``Route`` also names its destination: the key under which the scheduler
queues, limits concurrency and backs off, and under which finished sessions
are kept for reuse.  MX routes share one destination per domain, fixed next
hops one per ``host:port``.  A transport entry that names the smart
host's own ``host:port`` gets a destination of its own (with
`` tls=MODE`` appended) when the smart host's TLS or AUTH settings differ,
so that its sessions never carry mail that ``relayhost_tls`` or
``relayhost_username`` governs, and the reverse.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from relay.config import Config, parse_next_hop
from relay.units import format_host_port

LOCAL = "local"
SMTP = "smtp"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class Route:
    """Where and how to deliver one recipient."""

    kind: str  # LOCAL, SMTP or ERROR
    destination: str  # queue key: "local", a domain for MX routes, "[host]:port" otherwise
    host: str = ""  # domain to look up (use_mx) or the next hop's name or address
    port: int = 25
    use_mx: bool = True
    tls: str = "opportunistic"  # "required" (verified), "opportunistic" or "none"
    username: str = ""  # AUTH identity; "" for no AUTH
    password: str = ""
    error: str = ""  # for ERROR routes: the SMTP reply that fails the recipient
    relayhost: bool = False  # True for the ``[delivery] relayhost`` route


class Router:
    """Route recipients by the config's local domains, transport table, relayhost and MX."""

    def __init__(self, config: Config) -> None:
        self._local_domains = frozenset(config.policy.local_domains)
        self._transport = dict(config.delivery.transport)
        self._smtp_port = config.delivery.smtp_port
        self._mx_tls = config.delivery.mx_tls
        self._relayhost: Route | None = None
        delivery = config.delivery
        if delivery.relayhost:
            host, port, use_mx = parse_next_hop(delivery.relayhost)
            password = ""
            if delivery.relayhost_password_file:
                # NOTE: check_files has read this file already.  A file replaced
                # between the two reads fails here alone, in the scheduler's process.
                password = read_password(delivery.relayhost_password_file)
            self._relayhost = Route(
                kind=SMTP,
                destination=_fixed_destination(host, port, use_mx),
                host=host,
                port=port,
                use_mx=use_mx,
                tls=delivery.relayhost_tls,
                username=delivery.relayhost_username,
                password=password,
                relayhost=True,
            )

    def route(self, domain: str) -> Route:
        """Return the route for recipients at ``domain`` (lower-case, no trailing dot)."""
        domain = domain.rstrip(".").lower()
        if domain == "" or domain in self._local_domains:
            return Route(kind=LOCAL, destination=LOCAL)
        if domain.startswith("["):
            return self._literal_route(domain)
        entry = self._transport.get(domain)
        if entry is not None:
            if entry == LOCAL:
                return Route(kind=LOCAL, destination=LOCAL)
            host, port, use_mx = parse_next_hop(entry[len("smtp:") :])
            return Route(
                kind=SMTP,
                destination=self._next_hop_destination(host, port, use_mx),
                host=host,
                port=port,
                use_mx=use_mx,
                tls=self._mx_tls,
            )
        if self._relayhost is not None:
            return self._relayhost
        return Route(kind=SMTP, destination=domain, host=domain, port=self._smtp_port, tls=self._mx_tls)

    def _literal_route(self, domain: str) -> Route:
        text = domain[1:-1] if domain.endswith("]") else ""
        if text.lower().startswith("ipv6:"):
            text = text[len("ipv6:") :]
        try:
            address = parse_address(text)
        except ValueError:
            return Route(kind=ERROR, destination=ERROR, error=f"550 5.1.2 invalid address literal {domain}")
        if is_internal_address(address):
            return Route(
                kind=ERROR, destination=ERROR, error=f"550 5.7.1 delivery to address literal {domain} is not allowed"
            )
        if self._relayhost is not None:
            # A host that must send through a smart host often cannot reach port 25 itself.
            return self._relayhost
        host = str(address)
        return Route(
            kind=SMTP,
            destination=self._next_hop_destination(host, self._smtp_port, False),
            host=host,
            port=self._smtp_port,
            use_mx=False,
            tls=self._mx_tls,
        )


    def _next_hop_destination(self, host: str, port: int, use_mx: bool) -> str:
        """Return the destination of a transport or literal route, apart from the smart host's when they differ."""
        destination = _fixed_destination(host, port, use_mx)
        relayhost = self._relayhost
        if relayhost is None or destination != relayhost.destination:
            return destination
        if (relayhost.tls, relayhost.username) == (self._mx_tls, ""):
            return destination  # both open sessions the same way, so they may share them
        return f"{destination} tls={self._mx_tls}"


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an IP address, returning an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as its IPv4 address.

    A dual-stack socket connects to a mapped address over IPv4, so the checks
    for loopback and link-local addresses must see the IPv4 address, which
    Python 3.11's ``ipaddress`` does not do for the mapped form.
    """
    return _unmapped(ipaddress.ip_address(text))


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Return the IPv4 address inside an IPv4-mapped IPv6 address, or ``address`` itself."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_internal_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Return whether mail must never go to ``address``: loopback, link-local, multicast, unspecified or reserved.

    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is judged by its IPv4
    address, because a connection to it reaches that IPv4 address, while
    Python 3.11's ``is_loopback`` and ``is_link_local`` are false for it.
    """
    address = _unmapped(address)
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    )


def _fixed_destination(host: str, port: int, use_mx: bool) -> str:
    if use_mx:
        return format_host_port(host, port)
    return f"[{host}]:{port}"


def read_password(path: str) -> str:
    """Return the password stored in ``path``: its first line without the line end."""
    text = Path(path).read_text(encoding="utf-8")
    return text.splitlines()[0] if text else ""
