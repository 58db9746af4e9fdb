"""MX resolution against a real nsd on loopback: preference, implicit and null MX, failures, cache."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from delivery_peers import ZONE, NameServer, run_nsd

from conftest import free_port
from relay.delivery.dns import CACHE_SWEEP_MIN_ENTRIES, LookupFailure, MailHost, MXResolver
from relay.delivery.sessions import _drop_local_addresses, _limit_addresses


@pytest.fixture(scope="module")
def nameserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NameServer]:
    with run_nsd(tmp_path_factory.mktemp("nsd")) as server:
        yield server


def resolve(server: NameServer, domain: str, **options: object) -> list[MailHost]:
    resolver = MXResolver(server.nameservers, timeout=2.0, **options)  # type: ignore[arg-type]
    return asyncio.run(resolver.mail_hosts(domain))


def failure(server: NameServer, domain: str) -> LookupFailure:
    with pytest.raises(LookupFailure) as caught:
        resolve(server, domain)
    return caught.value


def test_mx_sorted_by_preference(nameserver: NameServer) -> None:
    hosts = resolve(nameserver, "mx.test")
    assert [h.name for h in hosts] == ["a.mx.test", "b.mx.test"]
    assert [h.addresses for h in hosts] == [("127.0.0.2",), ("127.0.0.3",)]


def test_equal_preferences_shuffled(nameserver: NameServer) -> None:
    orders = {tuple(h.name for h in resolve(nameserver, "equal.test")) for _ in range(30)}
    assert orders == {("a.mx.test", "b.mx.test"), ("b.mx.test", "a.mx.test")}


def test_implicit_mx_from_address_record(nameserver: NameServer) -> None:
    hosts = resolve(nameserver, "implicit.test")
    assert hosts == [MailHost("implicit.test", 0, ("127.0.0.4",))]


def test_null_mx_fails_without_address_fallback(nameserver: NameServer) -> None:
    error = failure(nameserver, "null.test")
    assert error.status == "5.1.10"
    assert not error.temporary


def test_nxdomain_fails_permanently(nameserver: NameServer) -> None:
    error = failure(nameserver, "nx.test")
    assert error.status == "5.1.2"
    assert error.reply.startswith("550 5.1.2")


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        ("a..test", "empty label"),
        (".test", "empty label"),
        ("a" * 64 + ".test", "longer than 63 octets"),
        (".".join(["a" * 63] * 4) + ".test", "longer than 253 octets"),
    ],
)
def test_invalid_dns_name_fails_permanently(nameserver: NameServer, domain: str, reason: str) -> None:
    error = failure(nameserver, domain)
    assert not error.temporary
    assert error.reply.startswith("550 5.1.2")
    assert reason in error.text


def test_longest_dns_name_looked_up(nameserver: NameServer) -> None:
    # 253 octets in text, 255 on the wire: the longest name DNS allows is queried, and nsd says NXDOMAIN.
    domain = ".".join(["a" * 63] * 3 + ["a" * 56]) + ".test"
    assert len(domain) == 253
    assert failure(nameserver, domain).text == f"domain {domain} not found"


@pytest.mark.parametrize("domain", ["straße.test", "STRAẞE.test.", "xn--strae-oqa.test"])
def test_u_label_domain_looked_up_by_idna2008(nameserver: NameServer, domain: str) -> None:
    # IDNA2003 would map "ß" to "ss" and look up strasse.test, another domain with another address.
    (host,) = resolve(nameserver, domain)
    assert host.addresses == ("127.0.0.31",)
    assert host.name == "xn--strae-oqa.test"


def test_no_mx_and_no_address_fails(nameserver: NameServer) -> None:
    assert failure(nameserver, "text-only.test").status == "5.4.4"


def test_cname_followed(nameserver: NameServer) -> None:
    assert [h.name for h in resolve(nameserver, "alias.test")] == ["a.mx.test", "b.mx.test"]


def test_ipv6_only_host(nameserver: NameServer) -> None:
    assert resolve(nameserver, "six.test") == [MailHost("v6.six.test", 10, ("::1",))]


def test_missing_mx_host_skipped(nameserver: NameServer) -> None:
    assert [h.name for h in resolve(nameserver, "two-mx.test")] == ["b.mx.test"]


def test_servfail_defers(nameserver: NameServer) -> None:
    error = failure(nameserver, "x.broken.test")
    assert error.temporary
    assert error.status == "4.4.3"


def test_nameservers_on_different_ports(nameserver: NameServer) -> None:
    # The first entry refuses every query, so each lookup moves on to the
    # second entry, which is nsd on a port of its own.
    (host, port), *_ = nameserver.nameservers
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as refuser:
        refuser.bind(("127.0.0.1", free_port()))
        refuser_port = refuser.getsockname()[1]
        refuser.settimeout(0.2)
        stop = threading.Event()

        def refuse() -> None:
            while not stop.is_set():
                try:
                    query, client = refuser.recvfrom(4096)
                except TimeoutError:
                    continue
                response = dns.message.make_response(dns.message.from_wire(query))
                response.set_rcode(dns.rcode.REFUSED)
                refuser.sendto(response.to_wire(), client)

        thread = threading.Thread(target=refuse)
        thread.start()
        try:
            resolver = MXResolver((("127.0.0.1", refuser_port), (host, port)), timeout=5.0)
            hosts = asyncio.run(resolver.mail_hosts("mx.test"))
        finally:
            stop.set()
            thread.join()
    assert refuser_port != port
    assert [h.name for h in hosts] == ["a.mx.test", "b.mx.test"]


def test_timeout_defers() -> None:
    # A bound UDP socket that never answers stands for an unreachable server.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", free_port()))
        resolver = MXResolver((("127.0.0.1", silent.getsockname()[1]),), timeout=0.5)
        with pytest.raises(LookupFailure) as caught:
            asyncio.run(resolver.mail_hosts("mx.test"))
    assert caught.value.temporary


def test_answers_cached_for_ttl(tmp_path: Path) -> None:
    clock = [1000.0]
    with run_nsd(tmp_path) as server:
        resolver = MXResolver(server.nameservers, timeout=2.0, clock=lambda: clock[0])

        async def lookups() -> None:
            first = await resolver.mail_hosts("mx.test")
            server.process.terminate()
            server.process.wait()
            clock[0] += 299
            assert await resolver.mail_hosts("mx.test") == first
            clock[0] += 2
            with pytest.raises(LookupFailure) as caught:
                await resolver.mail_hosts("mx.test")
            assert caught.value.temporary

        asyncio.run(lookups())


def test_hosts_from_self_on_dropped(nameserver: NameServer) -> None:
    # self.backup.test resolves to 127.0.0.1, so it and the hosts of preference 20 and 30 go.
    # Nothing connects to the documentation addresses (192.0.2.0/24) of the others.
    for _ in range(10):
        hosts = _drop_local_addresses(resolve(nameserver, "backup.test"), "backup.test", 10)
        assert hosts == [MailHost("p.backup.test", 10, ("192.0.2.10",))]


def test_link_local_only_mx_fails() -> None:
    # Checked without a connection, so that a regression cannot send a packet off loopback.
    hosts = [MailHost("ll.linklocal.test", 10, ("169.254.0.25", "fe80::25", "ff02::1"))]
    with pytest.raises(LookupFailure) as caught:
        _drop_local_addresses(hosts, "linklocal.test", 10)
    assert not caught.value.temporary
    assert caught.value.status == "5.4.4"


def test_address_limit_keeps_both_ip_versions(nameserver: NameServer) -> None:
    # Six IPv6 addresses come first; the limit of 5 still leaves room for the IPv4 host.
    # Documentation addresses only: nothing connects to them.
    hosts = _limit_addresses(resolve(nameserver, "dual.test"), 5)
    assert [host.name for host in hosts] == ["v6.dual.test", "v4.dual.test"]
    assert len(hosts[0].addresses) == 4
    assert hosts[1].addresses == ("192.0.2.40",)


def test_address_limit_keeps_mx_order(nameserver: NameServer) -> None:
    hosts = _limit_addresses(resolve(nameserver, "many.test"), 5)
    assert [host.name for host in hosts] == [f"m{n}.many.test" for n in range(1, 6)]


def test_truncated_answer_retried_over_tcp(tmp_path: Path) -> None:
    # 40 MX records whose long first labels differ, so that name compression cannot shorten
    # them, pass the 1232-octet EDNS payload, and nsd sets TC over UDP.
    label = "a-long-label-that-pads-each-mx-record"
    records = "".join(f"big IN MX {n} h{n}-{label}.test.\nh{n}-{label} IN A 127.0.1.{n + 1}\n" for n in range(40))
    with run_nsd(tmp_path, ZONE + records) as server:
        query = dns.message.make_query("big.test", "MX", use_edns=0, payload=1232)
        response = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2, raise_on_truncation=False)
        assert response.flags & dns.flags.TC
        hosts = resolve(server, "big.test")
    assert [host.preference for host in hosts] == list(range(40))
    assert hosts[-1] == MailHost(f"h39-{label}.test", 39, ("127.0.1.40",))


def test_expired_answers_leave_cache(nameserver: NameServer) -> None:
    # Each NXDOMAIN is cached for the SOA minimum of 60 s and the clock moves 1 s a lookup,
    # so at most about 60 answers are current at any time.
    clock = [1000.0]
    resolver = MXResolver(nameserver.nameservers, timeout=2.0, clock=lambda: clock[0])
    lookups = CACHE_SWEEP_MIN_ENTRIES + 200

    async def look_up_gone_domains() -> None:
        for n in range(lookups):
            with pytest.raises(LookupFailure):
                await resolver.mail_hosts(f"gone{n}.test")
            clock[0] += 1.0

    asyncio.run(look_up_gone_domains())
    assert len(resolver._cache) <= CACHE_SWEEP_MIN_ENTRIES


def test_numeric_mx_used_as_address(nameserver: NameServer, caplog: pytest.LogCaptureFixture) -> None:
    # "MX 10 127.0.0.7." names an address where a host name belongs; Postfix 3.x warns and connects to it.
    resolver = MXResolver(nameserver.nameservers, timeout=2.0)

    async def look_up_twice() -> list[MailHost]:
        first = await resolver.mail_hosts("numeric.test")
        assert await resolver.mail_hosts("numeric.test") == first
        return first

    with caplog.at_level("WARNING", logger="relay"):
        hosts = asyncio.run(look_up_twice())
    assert hosts == [MailHost("127.0.0.7", 10, ("127.0.0.7",))]
    warnings = [
        getattr(record, "fields", {}) for record in caplog.records if getattr(record, "event", "") == "mx_numeric_host"
    ]
    # The second lookup falls within the log interval, so one line covers both.
    assert len(warnings) == 1
    assert warnings[0]["domain"] == "numeric.test"
    assert warnings[0]["host"] == "127.0.0.7"


def test_name_with_numeric_labels_looked_up(nameserver: NameServer) -> None:
    # 127.0.0.7.test is a host name that starts with digits, not an address: its A record counts.
    assert resolve(nameserver, "looks-numeric.test") == [MailHost("127.0.0.7.test", 10, ("127.0.0.8",))]


def test_numeric_link_local_mx_fails(nameserver: NameServer) -> None:
    # Checked without a connection: an address written into the MX record passes the same checks.
    hosts = resolve(nameserver, "numeric-ll.test")
    assert [host.addresses for host in hosts] == [("169.254.0.25",), ("fe80::25",)]
    with pytest.raises(LookupFailure) as caught:
        _drop_local_addresses(hosts, "numeric-ll.test", 10)
    assert caught.value.reply.startswith("550 5.4.4")


@pytest.mark.parametrize("domain", ["primary-down.test", "primary-gone.test"])
def test_backup_mx_self_defers(nameserver: NameServer, domain: str) -> None:
    # The best MX host's lookup fails (SERVFAIL) or finds no such name, and the
    # backup is this host: the primary may be back later, so this is no loop yet.
    resolver = MXResolver(nameserver.nameservers, timeout=2.0)
    found = asyncio.run(resolver.find_mail_hosts(domain))
    assert found.hosts == [MailHost("lo.loop.test", 20, ("127.0.0.1",))]
    assert found.best_preference == 10
    with pytest.raises(LookupFailure) as caught:
        _drop_local_addresses(found.hosts, domain, found.best_preference)
    assert caught.value.temporary
    assert caught.value.status == "4.4.4"
    assert f"cannot find the primary MX host of {domain}" in caught.value.text


def test_best_mx_self_still_loops(nameserver: NameServer) -> None:
    resolver = MXResolver(nameserver.nameservers, timeout=2.0)
    found = asyncio.run(resolver.find_mail_hosts("loop.test"))
    with pytest.raises(LookupFailure) as caught:
        _drop_local_addresses(found.hosts, "loop.test", found.best_preference)
    assert caught.value.reply.startswith("554 5.4.6 mail for loop.test loops back to myself")


class _DelayingProxy:
    """A UDP DNS proxy on loopback that delays each A and AAAA query before passing it on to nsd.

    It records the maximum number of queries delayed at once.  A query for
    ``mN.many.test`` waits longer the smaller N is, so the first MX hosts
    answer last.  An AAAA query waits ``aaaa_extra_delay`` seconds more.
    """

    def __init__(self, upstream_port: int, aaaa_extra_delay: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.aaaa_extra_delay = aaaa_extra_delay
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", free_port()))
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]
        self.lock = threading.Lock()
        self.held = 0
        self.max_held = 0
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def serve(self) -> None:
        deadline = time.monotonic() + 30
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                wire, client = self.socket.recvfrom(4096)
            except TimeoutError:
                continue
            thread = threading.Thread(target=self.answer, args=(wire, client))
            thread.start()
            self.threads.append(thread)

    def answer(self, wire: bytes, client: tuple[str, int]) -> None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text()
        delay = 0.0
        rdtype = dns.rdatatype.to_text(question.rdtype)
        if rdtype in ("A", "AAAA"):
            digits = name.split(".")[0].lstrip("m")
            delay = 0.05 * (8 - int(digits)) if digits.isdigit() else 0.1
        if rdtype == "AAAA":
            delay += self.aaaa_extra_delay
        with self.lock:
            self.held += 1
            self.max_held = max(self.max_held, self.held)
        try:
            time.sleep(delay)
            response = dns.query.udp(query, "127.0.0.1", port=self.upstream_port, timeout=2)
        finally:
            with self.lock:
                self.held -= 1
        self.socket.sendto(response.to_wire(), client)

    def __enter__(self) -> _DelayingProxy:
        self.server = threading.Thread(target=self.serve)
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.join()
        for thread in self.threads:
            thread.join()
        self.socket.close()


@pytest.mark.parametrize("concurrency", [1, 3, 5])
def test_mx_addresses_looked_up_concurrently(nameserver: NameServer, concurrency: int) -> None:
    # many.test has six MX hosts, and each host's AAAA and A queries are in flight together.
    with _DelayingProxy(nameserver.port) as proxy:
        resolver = MXResolver((("127.0.0.1", proxy.port),), timeout=5.0, lookup_concurrency=concurrency)
        hosts = asyncio.run(resolver.mail_hosts("many.test"))
    assert proxy.max_held == 2 * concurrency
    assert [host.name for host in hosts] == [f"m{n}.many.test" for n in range(1, 7)]
    assert [host.addresses for host in hosts] == [(f"127.0.0.{20 + n}",) for n in range(1, 7)]


def _assert_dual_stack(hosts: list[MailHost]) -> None:
    # Within one family the addresses keep the answer's order, which nsd may vary.
    (host,) = hosts
    assert (host.name, host.preference) == ("ds.dual-stack.test", 10)
    assert set(host.addresses[:2]) == {"2001:db8::10", "2001:db8::11"}
    assert set(host.addresses[2:]) == {"192.0.2.50", "192.0.2.51"}


def test_host_aaaa_and_a_overlap(nameserver: NameServer) -> None:
    # ds.dual-stack.test has two AAAA and two A records.  The proxy delays the
    # AAAA query longer, so the A answer arrives first, and the IPv6
    # addresses must still come first.  Both queries wait in the proxy
    # together only when the second is sent before the first is answered.
    with _DelayingProxy(nameserver.port, aaaa_extra_delay=0.2) as proxy:
        resolver = MXResolver((("127.0.0.1", proxy.port),), timeout=5.0)
        hosts = asyncio.run(resolver.mail_hosts("dual-stack.test"))
    assert proxy.max_held == 2
    _assert_dual_stack(hosts)


def test_host_aaaa_and_a_both_answered(nameserver: NameServer) -> None:
    # Straight from nsd, without the proxy: both families are found, IPv6 first.
    _assert_dual_stack(resolve(nameserver, "dual-stack.test"))
