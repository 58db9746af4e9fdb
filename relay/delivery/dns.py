"""Find the hosts that receive mail for a domain: MX lookup with the RFC 5321 rules.

Standards: RFC 5321 section 5.1 (MX records sorted by preference, equal
preferences in random order, the domain's own address records as the
implicit MX when it has no MX), RFC 7505 (null MX ``MX 0 .``: the domain
accepts no mail, so delivery fails at once with ``5.1.10`` and no host is
contacted, not even the domain's own A record).

Queries go through ``dns.asyncresolver`` with ``Resolver(configure=False)``
pointed at ``[delivery] nameservers`` when set, else the system resolver.
CNAME chains are followed by the resolver.  Answers, NXDOMAIN and no-data
included, are cached in memory for their TTL (negative answers for the zone's
SOA minimum, RFC 2308 section 5), capped at ``MAX_CACHE_TTL``.  Expired
answers are dropped as the cache grows, so it holds about the names looked up
within the last ``MAX_CACHE_TTL``.

Failures: a domain that does not exist fails with ``5.1.2``, and so does
one that is no valid DNS name (an empty label, a label over 63 octets, a
name over 253, or a UTF-8 name that IDNA cannot encode), without a query.
RFC 3463 defines X.1.2 as an address whose part right of the "@" is invalid
for mail, and Postfix's ``dns_lookup()`` reports such a name as not found
without a query, as for NXDOMAIN.  ``5.1.3``
(bad address syntax) pairs with a ``501`` reply to the RCPT command, which
the SMTP server here already sends for these names.  A domain with
neither MX nor address records, or whose MX hosts all lack addresses, fails
with ``5.4.4``; SERVFAIL, REFUSED and timeouts are temporary (``4.4.3``) and
the recipient is retried later.  An MX host whose name does not resolve is
skipped and the next one tried.  The addresses of the MX hosts are looked
up concurrently, at most ``lookup_concurrency`` hosts at a time, and the
hosts keep the order of their MX preferences.  A host's AAAA and A queries
run concurrently as well, so up to twice that many queries are in flight.
Its IPv6 addresses still come first, each family in the order of its answer.

An MX record whose exchange is an IP address (``MX 10 192.0.2.1``) breaks
the record format, because the exchange is the domain name of a host (RFC
1035 section 3.3.9).  Postfix 3.x logs "numeric domain name in resource
data of MX record" and then uses the address as the host's only address,
without a lookup.  This module does the same and logs ``mx_numeric_host``.
Such an address passes the same loopback and link-local checks as looked-up
ones, and a connection to it fails or defers like any other.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relay.log import RepeatCounter, log_event

logger = logging.getLogger("relay.delivery")

# One hour: long enough to spare the resolver, short enough that a fixed zone
# takes effect soon even when its TTLs are days long.
MAX_CACHE_TTL = 3600.0
# Used for negative answers that carry no SOA record (RFC 2308 section 5 allows
# caching them only briefly).
NEGATIVE_TTL_WITHOUT_SOA = 60.0
# Expired answers are dropped whenever the cache has doubled since the last
# sweep, and not before it holds this many, so the cache keeps about the names
# looked up within MAX_CACHE_TTL instead of every name since the start.
CACHE_SWEEP_MIN_ENTRIES = 1024
# MX hosts whose addresses are looked up at once: Postfix's smtp_mx_address_limit
# (5), the default of [delivery] mx_address_limit, which the scheduler passes.
DEFAULT_LOOKUP_CONCURRENCY = 5
# A numeric MX host is logged about once per interval for each domain and
# host, so that each delivery attempt does not repeat the warning.
NUMERIC_MX_LOG_INTERVAL = MAX_CACHE_TTL
# Distinct (domain, host) pairs whose warnings are counted; the counts are
# dropped when more appear, so that a flood of such domains cannot grow memory.
NUMERIC_MX_COUNTERS_MAX = 1024


class LookupFailure(Exception):
    """A lookup that decided the delivery attempt, with the reply it amounts to.

    ``reply`` has the form of an SMTP reply (``"550 5.1.2 ..."``), so the
    scheduler records and reports it like one from a remote server.
    """

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text

    @property
    def temporary(self) -> bool:
        """True for a failure worth retrying later."""
        return self.code < 500

    @property
    def reply(self) -> str:
        """The failure as an SMTP reply line."""
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True, slots=True)
class MailHost:
    """One host to try for a domain, with its addresses in the order to try them."""

    name: str  # host name without the trailing dot
    preference: int  # MX preference; 0 for an implicit MX or a fixed next hop
    addresses: tuple[str, ...]  # IPv6 first, then IPv4 (RFC 6724 default order)


@dataclass(frozen=True, slots=True)
class MailHostList:
    """The hosts to try for a domain, with the preference of its most preferred MX record."""

    hosts: list[MailHost]  # as ``MXResolver.mail_hosts`` returns them
    # The lowest MX preference, also when that host has no address; 0 for an implicit MX.
    best_preference: int


@dataclass(slots=True)
class _CacheEntry:
    expires: float
    records: tuple[str, ...] | None  # None: the name does not exist (NXDOMAIN)


class MXResolver:
    """Resolve domains to mail hosts through one dnspython resolver, with a TTL cache."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        shuffle: Callable[[list[MailHost]], None] = random.shuffle,
        lookup_concurrency: int = DEFAULT_LOOKUP_CONCURRENCY,
    ) -> None:
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            # Each Nameserver object has its own port.  Plain addresses would all
            # use the resolver's single port.
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = timeout
        self._resolver = resolver
        self._clock = clock
        self._shuffle = shuffle
        self._cache: dict[tuple[str, str], _CacheEntry] = {}
        self._sweep_at = CACHE_SWEEP_MIN_ENTRIES
        self._lookup_concurrency = max(1, lookup_concurrency)
        self._numeric_mx_counters: dict[tuple[str, str], RepeatCounter] = {}

    async def mail_hosts(self, domain: str) -> list[MailHost]:
        """Return the hosts to try for ``domain`` in order; raise LookupFailure when none.

        Hosts with no address are left out.  An empty list is never returned.
        """
        return (await self.find_mail_hosts(domain)).hosts

    async def find_mail_hosts(self, domain: str) -> MailHostList:
        """Look up the hosts to try for ``domain``, as ``mail_hosts`` does, and the best MX preference."""
        name = _ascii_name(domain, "domain")
        try:
            mx_records = await self._lookup(name, "MX")
        except _TemporaryError as exc:
            raise LookupFailure(451, "4.4.3", f"MX lookup for {name} failed: {exc}") from None
        if mx_records is None:
            raise LookupFailure(550, "5.1.2", f"domain {name} not found")

        if not mx_records:
            hosts = [MailHost(name, 0, ())]
        else:
            hosts = self._order_mx(mx_records)
            if not hosts:
                raise LookupFailure(556, "5.1.10", f"domain {name} does not accept mail (null MX)")

        results = await self._host_addresses(name, hosts, from_mx=bool(mx_records))
        resolved: list[MailHost] = []
        temporary_error = ""
        for host, result in zip(hosts, results, strict=True):
            if isinstance(result, _TemporaryError):
                temporary_error = f"address lookup for {host.name} failed: {result}"
            elif result:
                resolved.append(MailHost(host.name, host.preference, result))
        if resolved:
            return MailHostList(resolved, hosts[0].preference)
        if temporary_error:
            raise LookupFailure(451, "4.4.3", temporary_error)
        if not mx_records:
            raise LookupFailure(550, "5.4.4", f"domain {name} has no MX and no address records")
        raise LookupFailure(550, "5.4.4", f"no MX host of {name} has an address")

    async def host_addresses(self, host: str) -> tuple[str, ...]:
        """Return the addresses of a next hop named without MX lookup; raise LookupFailure when none."""
        host = _ascii_name(host, "host")
        try:
            addresses = await self._addresses(host)
        except _TemporaryError as exc:
            raise LookupFailure(451, "4.4.3", f"address lookup for {host} failed: {exc}") from None
        if not addresses:
            raise LookupFailure(550, "5.4.4", f"host {host} has no address records")
        return addresses

    async def _host_addresses(
        self, domain: str, hosts: list[MailHost], *, from_mx: bool
    ) -> list[tuple[str, ...] | _TemporaryError]:
        """Look up the addresses of ``hosts`` concurrently and return each host's addresses or error, in order.

        ``from_mx`` is False for the implicit MX, the domain itself, whose
        name is looked up even when it looks like an address.
        """
        limit = asyncio.Semaphore(self._lookup_concurrency)

        async def look_up(host: MailHost) -> tuple[str, ...] | _TemporaryError:
            numeric = _numeric_host(host.name) if from_mx else None
            if numeric is not None:
                self._log_numeric_mx(domain, host)
                return (numeric,)
            async with limit:
                try:
                    return await self._addresses(host.name)
                except _TemporaryError as exc:
                    return exc

        # A TaskGroup cancels the other lookups when one raises anything else.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(look_up(host)) for host in hosts]
        return [task.result() for task in tasks]

    def _log_numeric_mx(self, domain: str, host: MailHost) -> None:
        key = (domain, host.name)
        counter = self._numeric_mx_counters.get(key)
        if counter is None:
            if len(self._numeric_mx_counters) >= NUMERIC_MX_COUNTERS_MAX:
                self._numeric_mx_counters.clear()
            counter = self._numeric_mx_counters[key] = RepeatCounter(NUMERIC_MX_LOG_INTERVAL)
        count = counter.note()
        if count is not None:
            log_event(logger, "mx_numeric_host", logging.WARNING, domain=domain, host=host.name,
                      preference=host.preference, count=count, action="using it as the host's address")

    async def _addresses(self, host: str) -> tuple[str, ...]:
        """Look up the AAAA and A records of ``host`` concurrently and return the IPv6 addresses first.

        A temporary failure of one family counts only when the other found
        nothing.  When both fail, the A query's error is raised.
        """
        name = host.rstrip(".").lower()

        async def look_up(rdtype: str) -> tuple[str, ...] | None | _TemporaryError:
            try:
                return await self._lookup(name, rdtype)
            except _TemporaryError as exc:
                return exc

        # A TaskGroup cancels the other query when one raises anything else.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(look_up(rdtype)) for rdtype in ("AAAA", "A")]

        found: list[str] = []
        failure: _TemporaryError | None = None
        for task in tasks:
            records = task.result()
            if isinstance(records, _TemporaryError):
                failure = records
            elif records:
                found.extend(records)
        if not found and failure is not None:
            raise failure
        return tuple(found)

    def _order_mx(self, records: tuple[str, ...]) -> list[MailHost]:
        by_preference: dict[int, list[MailHost]] = {}
        for record in records:
            preference_text, _, exchange = record.partition(" ")
            target = exchange.rstrip(".").lower()
            # RFC 7505 section 3: a null MX ("." as exchange) means no mail;
            # any other MX listed beside it is still used.
            if target == "":
                continue
            preference = int(preference_text)
            by_preference.setdefault(preference, []).append(MailHost(target, preference, ()))
        ordered: list[MailHost] = []
        for preference in sorted(by_preference):
            group = by_preference[preference]
            self._shuffle(group)
            ordered.extend(group)
        return ordered

    async def _lookup(self, name: str, rdtype: str) -> tuple[str, ...] | None:
        """Return the records as text, () for no data, None for NXDOMAIN; cached by TTL."""
        key = (name, rdtype)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and entry.expires > now:
            return entry.records

        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            self._store(key, None, _negative_ttl(responses.values()), now)
            return None
        except dns.resolver.NoAnswer as exc:
            response = exc.kwargs.get("response")
            self._store(key, (), _negative_ttl([response] if response is not None else []), now)
            return ()
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise _TemporaryError(_describe(exc)) from None
        except dns.exception.DNSException as exc:
            raise _TemporaryError(_describe(exc)) from None

        if answer.rrset is None:
            records: tuple[str, ...] = ()
            ttl = NEGATIVE_TTL_WITHOUT_SOA
        else:
            records = tuple(record.to_text() for record in answer.rrset)
            ttl = float(answer.rrset.ttl)
        self._store(key, records, ttl, now)
        return records

    def _store(self, key: tuple[str, str], records: tuple[str, ...] | None, ttl: float, now: float) -> None:
        self._cache[key] = _CacheEntry(now + min(ttl, MAX_CACHE_TTL), records)
        if len(self._cache) >= self._sweep_at:
            self._cache = {key: entry for key, entry in self._cache.items() if entry.expires > now}
            self._sweep_at = max(CACHE_SWEEP_MIN_ENTRIES, 2 * len(self._cache))


def _ascii_name(text: str, kind: str) -> str:
    """Return ``text`` as a lower-case DNS name in ASCII (A-labels), without the trailing dot.

    U-labels are converted by IDNA2008 with the UTS #46 mapping and without
    its transitional processing (RFC 5891, as Postfix does through ICU), so
    ``straße`` becomes ``xn--strae-oqa`` and not the unrelated ``strasse``
    that dnspython's IDNA2003 default would look up.

    Raises a permanent LookupFailure when ``text`` cannot be a DNS name, so it
    is never retried.  dnspython raises the same error on every query for such
    a name, and a retry could only fail the same way until the queue lifetime
    ran out.
    """
    name = text.rstrip(".").lower()
    try:
        return dns.name.from_text(name, idna_codec=dns.name.IDNA_2008_Practical).to_text(omit_final_dot=True)
    except dns.name.EmptyLabel:
        reason = "it has an empty label"
    except dns.name.LabelTooLong:
        reason = "a label is longer than 63 octets"
    except dns.name.NameTooLong:
        reason = "it is longer than 253 octets"
    except dns.name.IDNAException as exc:
        reason = f"IDNA cannot encode it ({exc})"
    except dns.exception.SyntaxError as exc:
        reason = f"{type(exc).__name__}"
    raise LookupFailure(550, "5.1.2", f"{kind} {name} is not a valid DNS name: {reason}")


def _numeric_host(name: str) -> str | None:
    """Return the address that an MX exchange such as ``192.0.2.1`` is written as, or None for a host name."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None


class _TemporaryError(Exception):
    """A lookup that may succeed later: SERVFAIL, REFUSED, timeout, no reachable server."""


def _describe(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no nameserver answered (SERVFAIL or REFUSED)"
    return type(exc).__name__


def _negative_ttl(responses: Iterable[object]) -> float:
    """Return the RFC 2308 negative-caching time from the SOA in a response's authority section."""
    ttls: list[float] = []
    for response in responses:
        if not isinstance(response, dns.message.Message):
            continue
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
                ttls.append(float(min(rrset.ttl, rrset[0].minimum)))
    return min(ttls) if ttls else NEGATIVE_TTL_WITHOUT_SOA
