"""Load and validate relay.toml into typed, immutable settings.

Every default lives in the dataclasses below, so running with no file gives a
working relay: one ``mx`` listener on 127.0.0.1:2525 without TLS, the spool in
``./relay-spool``, local domain ``localhost`` delivered to Maildirs under
``./mail``, loopback as the only trusted network, everything else by MX.

Validation collects every problem before giving up and reports each one as
``FILE:section.key: what is wrong and what is expected``; listeners are named
``listener[N]`` by their zero-based position in the file.  Relative paths in a
file are resolved against the file's directory; without a file, against the
current directory.  Sizes accept ``K``/``M``/``G`` suffixes and durations
``s``/``m``/``h``/``d``/``w`` (see ``relay.units``).
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import ipaddress
import math
import os
import pwd
import re
import reprlib
import socket
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from relay.units import (
    format_duration,
    format_host_port,
    hostname_problem,
    is_hostname,
    is_safe_user_name,
    parse_duration,
    parse_host_port,
    parse_size,
)

ROLES = ("mx", "submission", "sink")
TLS_MODES = ("none", "starttls", "implicit")
RELAYHOST_TLS_MODES = ("required", "opportunistic", "none")
MX_TLS_MODES = ("opportunistic", "none")
BARE_LF_POLICIES = ("reject", "normalize")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Protocol names as OpenSSL and Postfix's *_tls_protocols spell them, oldest first.
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


# Maximum number of worker processes: far beyond any machine's cores, and a bound on the forks at start.
MAX_WORKERS = 256
# The largest policy.max_message_size accepted, 1 TiB, in octets.
MAX_MESSAGE_SIZE_CEILING = 1 << 40
# Octets in a host name written as dotted text: RFC 1035 section 2.3.4 allows
# 255 octets in wire form, which is 253 as text.
MAX_HOSTNAME_OCTETS = 253
# The largest value an "int" or "size" key without a maximum of its own accepts.
_INTEGER_CEILING = (1 << 62) - 1
# The longest duration a key without a maximum of its own accepts: 1000 weeks,
# about 19 years.  select() and threading waits reject timeouts above about
# 292 years (2**63 nanoseconds), and relay sendmail -bs passes its timeouts to select().
_DURATION_CEILING = 1000 * 7 * 86400.0


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` contains one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# Each field's metadata names the parser that turns the TOML value into the
# field's type; ``_parse_section`` reads it so sections need no loader code.
def _key(default: Any, kind: str, **options: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or mapping proxy for immutable defaults")
    metadata = {"kind": kind, **options}
    if isinstance(default, MappingProxyType):
        # dataclasses reject unhashable defaults even when they are read-only.
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


# The environment variable naming the config file that commands read when
# they are given no --config.
CONFIG_ENVIRONMENT = "RELAY_CONFIG"

_LOCALHOST_NAMES = ("localhost", "localhost.localdomain")


def _is_qualified_name(name: str) -> bool:
    return "." in name and name.lower() not in _LOCALHOST_NAMES and is_hostname(name)


def _default_hostname() -> str:
    """Return the default server.hostname.

    That is socket.getfqdn(), unless it is localhost, localhost.localdomain or a
    name without a dot and socket.gethostname() is a dotted name other than those.
    getfqdn() returns "localhost" on hosts whose /etc/hosts lists localhost first
    for 127.0.0.1.  A result that is not a valid DNS name becomes "localhost".
    """
    name = socket.getfqdn()
    if not _is_qualified_name(name):
        hostname = socket.gethostname()
        if _is_qualified_name(hostname):
            name = hostname
    return name if is_hostname(name) else "localhost"


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = field(default_factory=_default_hostname, metadata={"kind": "hostname"})
    # One worker process per CPU, like a pre-forked Postfix smtpd pool sized to the box.
    workers: int = field(
        default_factory=lambda: min(os.cpu_count() or 1, MAX_WORKERS),
        metadata={"kind": "int", "min": 1, "max": MAX_WORKERS},
    )
    # How long transactions already in DATA may run after SIGTERM before they get 421.
    shutdown_grace: float = _key(30.0, "duration")
    # Postfix: default_process_limit 100 per service; we count connections, not processes.
    max_connections: int = _key(1000, "int", min=1)
    # Postfix: smtpd_client_connection_count_limit = 50.
    max_connections_per_client: int = _key(50, "int", min=1)
    # RFC 5321 section 4.5.3.2.7: a server waits at least 5 minutes for the next command.
    command_timeout: float = _key(300.0, "duration", positive=True)
    # RFC 5321 section 4.5.3.2.6 (data termination) is 10 minutes on the client side;
    # this is the server's wait between two reads inside DATA.  relay sendmail
    # drops the rest of a message that is too large for at most this long.
    data_timeout: float = _key(600.0, "duration", positive=True)
    # Wait for a client's TLS handshake after STARTTLS, or on an implicit-TLS
    # listener.  Postfix's smtpd_starttls_timeout is 300s; a handshake needs far less.
    tls_handshake_timeout: float = _key(60.0, "duration", positive=True)
    # Wait for replies still unsent when relay closes a connection, then abort it.
    # Postfix's smtpd_timeout (300s) also bounds the sending of one reply.
    close_timeout: float = _key(300.0, "duration", positive=True)
    # Postfix: smtpd_hard_error_limit = 20 errors before the session is dropped.
    max_errors: int = _key(20, "int", min=1)
    # Postfix: smtpd_junk_command_limit = 100 HELO, EHLO, NOOP, RSET and VRFY
    # commands (and here empty BDAT chunks without LAST), after which each one
    # counts as an error too.
    max_junk_commands: int = _key(100, "int", min=1)
    # Hold the 220 this long for untrusted clients and drop those that talk first
    # (554 5.5.0).  Off by default like Postfix smtpd; postscreen waits 6s.
    greeting_delay: float = _key(0.0, "duration")
    # Stop reading a client's commands while this many octets of replies to it
    # are unsent.  64 KiB is the high-water mark of asyncio's and uvloop's
    # (0.23) TCP transports; their TLS transports default to 512 KiB.
    max_unsent_replies: int = _key(64 * 1024, "size", min=1, max=1 << 30)


@dataclass(frozen=True)
class ListenerConfig:
    address: tuple[str, int] = _key(("127.0.0.1", 2525), "hostport")
    role: str = _key("mx", "choice", choices=ROLES)
    tls: str = _key("none", "choice", choices=TLS_MODES)
    # RFC 4954 section 4: offer AUTH without TLS only when the operator says so.
    auth_plaintext: bool = _key(False, "bool")

    @property
    def address_text(self) -> str:
        return format_host_port(*self.address)


@dataclass(frozen=True)
class TLSConfig:
    cert: str = _key("", "path", must_exist=True)
    key: str = _key("", "path", must_exist=True)
    # Oldest TLS version the STARTTLS and implicit-TLS listeners accept.  Submission
    # listeners, where passwords cross, share it, so the default stays TLS 1.2.
    # Old devices that speak only TLS 1.0 or 1.1 need it lowered (see
    # relay.smtp.tls.set_minimum_version).
    min_version: str = _key("TLSv1.2", "choice", choices=TLS_VERSIONS)


@dataclass(frozen=True)
class SpoolConfig:
    path: str = _key("relay-spool", "path", required=True)
    # Group commit: at most this many messages (or octets) share one transaction and
    # its fsync; larger batches add little once the fsync is shared by hundreds.
    commit_batch_messages: int = _key(512, "int", min=1)
    commit_batch_bytes: int = _key(64 * 1024 * 1024, "size", min=1)
    # How long a commit waits for another worker process's write lock before the
    # session gets 452 4.3.1; a group commit holds the lock for milliseconds.
    # At most a day: SQLite (3.40) reads a busy timeout above 2**31 - 1 ms, about
    # 24.8 days, as none at all.
    busy_timeout: float = _key(10.0, "duration", positive=True, max=86400.0)
    # A claimed recipient is leased to its scheduler this long: the sum of the RFC 5321
    # section 4.5.3.2 client timeouts (5+5+5+2+3+10 minutes).  A transaction that
    # takes longer, with many recipients or a slow next hop, renews the lease while
    # it runs (relay.delivery.scheduler).  The lease bounds how long a claimed job
    # may wait in memory before it is sent, and how long the recipients of a
    # scheduler that died without releasing them wait.
    lease_time: float = _key(1800.0, "duration", min=1.0)
    # A claim made with Spool.claim(bodies=True) carries each body up to this size,
    # read in the claim's transaction, so small messages need no second read.
    # Larger bodies are read separately to bound the claim's memory.
    claim_body_max_bytes: int = _key(64 * 1024, "size", min=0)
    # While other clients are connected to the same worker, a message commit waits
    # this long for theirs to join its transaction, so several messages share one
    # fsync.  It adds this much to the time before the 250.  0 turns it off.
    commit_delay: float = _key(0.0005, "duration", max=0.1)


@dataclass(frozen=True)
class PolicyConfig:
    local_domains: tuple[str, ...] = _key(("localhost",), "domains")
    relay_domains: tuple[str, ...] = _key((), "domains")
    trusted_networks: tuple[str, ...] = _key(("127.0.0.0/8", "::1/128"), "networks")
    # Postfix: message_size_limit = 10240000; we follow the DESIGN default of 35 MiB.
    # At most 1 TiB: the compiled buffer counts octets in a C ssize_t.
    max_message_size: int = _key(36700160, "size", min=1, max=MAX_MESSAGE_SIZE_CEILING)
    # Postfix: smtpd_recipient_limit = 1000.
    max_recipients: int = _key(1000, "int", min=1)
    # RFC 5321 section 4.5.3.1.4: 512 octets including CRLF.
    max_line_length: int = _key(512, "size", min=512, max=1 << 20)
    # RFC 4954 section 4: AUTH lines may be up to 12288 octets.
    max_auth_line_length: int = _key(12288, "size", min=512, max=1 << 20)
    # RFC 5321 section 6.3 requires a loop limit of at least 100 Received headers.
    max_received_headers: int = _key(100, "int", min=1)
    allow_address_literals: bool = _key(False, "bool")
    # What to do with a bare LF or CR in message data: reject (521 5.5.2) or
    # normalize to CRLF, which is honoured only for trusted clients.
    bare_lf: str = _key("reject", "choice", choices=BARE_LF_POLICIES)


@dataclass(frozen=True)
class AuthConfig:
    # File of "user:scrypt-hash" lines written by `relay passwd`; empty: AUTH off.
    password_file: str = _key("", "path", must_exist=True)
    # After this many failed AUTH attempts from one client address, each further
    # 535 is delayed by failure_delay (Postfix smtpd_soft_error_limit = 10 with
    # smtpd_error_sleep_time = 1s; AUTH guessing warrants an earlier, longer pause).
    failures_before_delay: int = _key(3, "int", min=0)
    failure_delay: float = _key(2.0, "duration")


@dataclass(frozen=True)
class DeliveryConfig:
    # false: receive and spool only, with no scheduler; mail waits in the spool
    # until delivery is turned on again (for maintenance and acceptance benchmarks).
    enabled: bool = _key(True, "bool")
    relayhost: str = _key("", "relayhost")
    relayhost_tls: str = _key("required", "choice", choices=RELAYHOST_TLS_MODES)
    relayhost_username: str = _key("", "str")
    relayhost_password_file: str = _key("", "path", must_exist=True)
    nameservers: tuple[tuple[str, int], ...] = _key((), "hostports", default_port=53, addresses_only=True)
    smtp_port: int = _key(25, "int", min=1, max=65535)
    # Postfix: maximal_queue_lifetime = 5d.
    maximal_queue_lifetime: float = _key(5 * 86400.0, "duration")
    # The queue lifetime of a message with the null reverse-path (a DSN, for one),
    # whose failure no sender hears about.  Postfix: bounce_queue_lifetime = 5d.
    bounce_queue_lifetime: float = _key(5 * 86400.0, "duration")
    transport: Mapping[str, str] = _key(MappingProxyType({}), "transport")
    # TLS for MX and transport-table hosts: opportunistic tries STARTTLS without
    # verifying and falls back to plaintext; Postfix's smtp_tls_security_level "may".
    mx_tls: str = _key("opportunistic", "choice", choices=MX_TLS_MODES)
    # CA bundle for verifying the smart host under relayhost_tls = "required";
    # empty: the system store (Postfix: smtp_tls_CAfile).
    tls_ca_file: str = _key("", "path", must_exist=True)
    # Oldest TLS version offered to next hops with opportunistic TLS (MX and
    # transport hosts, relayhost_tls = "opportunistic").  RFC 7435: weak TLS beats
    # the plaintext that a failed handshake falls back to; Postfix 3.7 defaults
    # smtp_tls_protocols to ">=TLSv1".
    tls_min_version: str = _key("TLSv1", "choice", choices=TLS_VERSIONS)
    # Oldest TLS version for relayhost_tls = "required", where a failed handshake
    # defers the mail instead of falling back, and the AUTH password follows.
    tls_mandatory_min_version: str = _key("TLSv1.2", "choice", choices=TLS_VERSIONS)
    # Postfix: default_destination_concurrency_limit = 20.
    destination_concurrency_limit: int = _key(20, "int", min=1)
    # Postfix: default_process_limit = 100 smtp client processes.
    connection_limit: int = _key(100, "int", min=1)
    # Postfix: smtp_destination_recipient_limit = 50.
    recipients_per_transaction: int = _key(50, "int", min=1, max=1000)
    # Postfix: minimal_backoff_time = 300s.  Each retry doubles the wait, with up
    # to a quarter added at random so retries spread out, up to the maximum.
    minimal_backoff_time: float = _key(300.0, "duration", positive=True)
    # Postfix uses 4000s; about 4 hours keeps a dead host from being polled often.
    maximal_backoff_time: float = _key(4 * 3600.0, "duration", positive=True)
    # Consecutive failed connections to every host of a destination before the
    # whole destination waits out its backoff (Postfix:
    # default_destination_concurrency_failed_cohort_limit = 1).
    destination_failure_limit: int = _key(1, "int", min=1)
    # Postfix: smtp_mx_address_limit = 5.  Addresses tried in one delivery attempt
    # over all MX hosts of a domain, in MX order, so a domain with many dead MX
    # hosts cannot hold a worker for a connect timeout each; 0: no limit.
    mx_address_limit: int = _key(5, "int", min=0)
    # An MX host (or implicit MX) that resolves to a loopback or unspecified
    # address is this host, so by default it is dropped with every less
    # preferred host (RFC 5321 section 5.1), as Postfix does for its own
    # addresses.  true uses such hosts: for test setups whose MX peers all
    # listen on 127.0.0.0/8 or ::1.
    allow_loopback_mx: bool = _key(False, "bool")
    # Postfix: delay_warning_time = 0h, so no delay warnings by default.
    delay_warning_time: float = _key(0.0, "duration")
    # Copy a failed message with the null sender to postmaster (Postfix:
    # notify_classes without "2bounce" by default, so off).
    bounce_copy_to_postmaster: bool = _key(False, "bool")
    # Postfix: smtp_connection_cache_time_limit = 2s of idle time before close.
    connection_cache_time: float = _key(2.0, "duration")
    # Send with BDAT (RFC 3030 CHUNKING) to next hops that offer it; false uses DATA for all.
    chunking: bool = _key(True, "bool")
    # RFC 6152 section 3: 8-bit mail for a next hop without 8BITMIME is
    # converted to 7 bit, as with Postfix's disable_mime_output_conversion = no.
    # With false, such mail bounces with 5.6.3.
    mime_downgrade: bool = _key(True, "bool")
    # RFC 5321 section 4.5.3.1.6 allows 1000 octets with the CRLF; longer lines
    # are broken before sending (Postfix 3.7: smtp_line_length_limit = 998).
    line_length_limit: int = _key(998, "int", min=78, max=1 << 30)
    # Octets per reply line, CRLF included, that are read from a next hop; the
    # rest of a longer line is dropped.  RFC 5321 section 4.5.3.1.5 sets 512,
    # but a server may send longer reply text, and Postfix's SMTP client reads
    # up to line_length_limit = 2048 octets of each reply line.
    reply_line_limit: int = _key(2048, "int", min=512, max=65536)
    # How often the scheduler looks for due recipients when nothing woke it.
    queue_scan_interval: float = _key(1.0, "duration", positive=True)
    # When new mail wakes the scheduler, the least time between two claims, so
    # that a burst of mail is claimed in batches instead of one claim per message.
    claim_min_interval: float = _key(0.01, "duration", max=1.0)
    # Postfix: smtp_connect_timeout = 30s.
    connect_timeout: float = _key(30.0, "duration", positive=True)
    # RFC 5321 section 4.5.3.2.1: initial 220 message, 5 minutes.
    greeting_timeout: float = _key(300.0, "duration", positive=True)
    # Postfix: smtp_helo_timeout = 300s; also bounds STARTTLS and AUTH replies.
    helo_timeout: float = _key(300.0, "duration", positive=True)
    # RFC 5321 section 4.5.3.2.2: MAIL command, 5 minutes.
    mail_timeout: float = _key(300.0, "duration", positive=True)
    # RFC 5321 section 4.5.3.2.3: RCPT command, 5 minutes.
    rcpt_timeout: float = _key(300.0, "duration", positive=True)
    # RFC 5321 section 4.5.3.2.4: DATA initiation, 2 minutes.
    data_init_timeout: float = _key(120.0, "duration", positive=True)
    # RFC 5321 section 4.5.3.2.5: each data block send, 3 minutes.
    data_block_timeout: float = _key(180.0, "duration", positive=True)
    # RFC 5321 section 4.5.3.2.6: DATA termination, 10 minutes.
    data_done_timeout: float = _key(600.0, "duration", positive=True)
    # Postfix: smtp_rset_timeout = 20s and smtp_quit_timeout = 300s; one key for both.
    rset_timeout: float = _key(20.0, "duration", positive=True)
    # Whole time for one DNS lookup, retries included; dnspython's own default is 5s,
    # doubled so one slow authoritative server does not defer mail.
    dns_timeout: float = _key(10.0, "duration", positive=True)


@dataclass(frozen=True)
class LocalConfig:
    maildir_root: str = _key("mail", "path", required=True)
    users: tuple[str, ...] = _key((), "users")
    aliases: str = _key("", "path", must_exist=True)
    # Postfix: virtual_alias_expansion_limit = 1000; see relay.aliases.DEFAULT_EXPANSION_LIMIT.
    alias_expansion_limit: int = _key(1000, "int", min=1)


@dataclass(frozen=True)
class LogConfig:
    format: str = _key("text", "choice", choices=LOG_FORMATS)
    level: str = _key("info", "choice", choices=LOG_LEVELS)


@dataclass(frozen=True)
class AdminConfig:
    # Empty string: the admin listener is off.
    address: str = _key("127.0.0.1:9025", "optional_hostport")
    # Distinct values of the metrics' destination label; later ones count as "other".
    max_destination_labels: int = _key(100, "int", min=1)
    # Admin connections open at once; more are answered 503 and closed, so that
    # idle clients cannot take the file descriptors that worker 0's SMTP listeners need.
    max_connections: int = _key(16, "int", min=1)


@dataclass(frozen=True)
class Config:
    """All settings; ``source`` is the file they came from, or None for defaults."""

    server: ServerConfig = field(default_factory=ServerConfig)
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    tls: TLSConfig = field(default_factory=TLSConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    source: str | None = None
    # Settings given on the command line ("listener", "spool.path", ...): a
    # reload keeps them without reporting that the file's value needs a restart.
    overrides: frozenset[str] = frozenset()

    def replace(self, **changes: Any) -> Config:
        """Return a copy with top-level sections replaced."""
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "tls": TLSConfig,
    "spool": SpoolConfig,
    "policy": PolicyConfig,
    "auth": AuthConfig,
    "delivery": DeliveryConfig,
    "local": LocalConfig,
    "log": LogConfig,
    "admin": AdminConfig,
}


class _Context:
    """Error collector and path resolver for one load."""

    def __init__(self, filename: str, base: Path) -> None:
        self.filename = filename
        self.base = base
        self.errors: list[str] = []
        # Keys ("delivery.relayhost") and sections ("listener[1]") whose value was
        # invalid.  The loaded config contains the default there, so the cross-key
        # checks skip them instead of reporting errors that follow from the default.
        self.invalid: set[str] = set()

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.filename}:{key}: {message}")

    def is_invalid(self, key: str) -> bool:
        """Return whether the value of ``section.key``, or its whole section, was invalid."""
        section = key.partition(".")[0]
        return key in self.invalid or section in self.invalid

    def resolve(self, value: str) -> str:
        if value == "":
            return ""
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else self.base / path)


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


_value_repr = reprlib.Repr()
_value_repr.maxstring = 60
_value_repr.maxother = 60


def _describe(value: Any) -> str:
    """Return the TOML type and value for an error message, such as ``string 'lots'``.

    Long strings, arrays and tables are shortened with "...".
    """
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    return f"{_type_name(value)} {_value_repr.repr(value)}"


def _expect(value: Any, types: tuple[type, ...], what: str) -> None:
    # TOML booleans are Python bools, which are also ints.
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise ValueError(f"expected {what}, got {_describe(value)}")


def _expect_items(value: Any, types: tuple[type, ...], what: str) -> None:
    """Raise ValueError unless value is an array whose items are all of ``types``."""
    _expect(value, (list,), what)
    for index, item in enumerate(value):
        if (isinstance(item, bool) and bool not in types) or not isinstance(item, types):
            raise ValueError(f"expected {what}, but item {index} is {_describe(item)}")


def _parse_domains(value: Any) -> tuple[str, ...]:
    _expect_items(value, (str,), "an array of domain names")
    domains = []
    invalid = []
    for item in value:
        name = item.strip().rstrip(".").lower()
        if is_hostname(name):
            domains.append(name)
        else:
            invalid.append(repr(item))
    if invalid:
        # One line names every bad item, so one round of fixes clears them all.
        label = "domain" if len(invalid) == 1 else "domains"
        raise ValueError(f"invalid {label} {', '.join(invalid)}; expected a DNS name such as \"example.test\"")
    return tuple(domains)


def _parse_networks(value: Any) -> tuple[str, ...]:
    _expect_items(value, (str,), "an array of networks in CIDR notation")
    networks = []
    invalid = []
    for item in value:
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            invalid.append(repr(item))
    if invalid:
        label = "network" if len(invalid) == 1 else "networks"
        raise ValueError(f"invalid {label} {', '.join(invalid)}; expected CIDR notation such as \"192.0.2.0/24\"")
    return tuple(networks)


def _parse_relayhost(value: Any) -> str:
    _expect(value, (str,), "a string such as \"[smtp.provider.test]:587\"")
    if value == "":
        return ""
    parse_next_hop(value)
    return str(value)


def parse_next_hop(value: str) -> tuple[str, int, bool]:
    """Parse ``[host]:port`` or ``host[:port]`` into (host, port, use_mx).

    As in Postfix, brackets turn off the MX lookup for the host.
    """
    if value.startswith("[") and "]" in value:
        inner_end = value.index("]")
        host_text = value[1:inner_end]
        rest = value[inner_end + 1 :]
        host, port = parse_host_port(f"[{host_text}]{rest}" if ":" in host_text else f"{host_text}{rest}", 25)
        return host, port, False
    host, port = parse_host_port(value, 25)
    return host, port, True


def _parse_transport(value: Any) -> Mapping[str, str]:
    _expect(value, (dict,), "a table of domain = \"smtp:[host]:port\" or \"local\"")
    routes: dict[str, str] = {}
    for domain, route in value.items():
        name = domain.strip().rstrip(".").lower()
        if not is_hostname(name):
            raise ValueError(f"invalid domain {domain!r}; expected a DNS name")
        if not isinstance(route, str):
            raise ValueError(
                f"route for {domain!r} must be a string such as \"smtp:[127.0.0.1]:2526\" or \"local\","
                f" got {_describe(route)}"
            )
        if route != "local":
            if not route.startswith("smtp:"):
                raise ValueError(f"invalid route {route!r} for {domain!r}; expected \"smtp:[host]:port\" or \"local\"")
            try:
                parse_next_hop(route[len("smtp:") :])
            except ValueError as exc:
                raise ValueError(f"invalid route {route!r} for {domain!r}: {exc}") from None
        routes[name] = route
    return MappingProxyType(routes)


def _convert(kind: str, value: Any, options: Mapping[str, Any], ctx: _Context) -> Any:
    """Turn one raw TOML value into the field's type, or raise ValueError."""
    if kind == "str":
        _expect(value, (str,), "a string")
        return value
    if kind == "bool":
        _expect(value, (bool,), "true or false")
        return value
    if kind == "int":
        _expect(value, (int,), "an integer")
        converted: Any = value
    elif kind == "size":
        low = options.get("min")
        if type(value) is int and value < 0 and low is not None:
            # parse_size's message asks for "0 or more", which is wrong for a key whose minimum is 1.
            raise ValueError(f"value {value} is below the minimum {low}")
        converted = parse_size(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        if converted is None:
            raise ValueError(f"expected a size such as 10485760 or \"10M\", got {_describe(value)}")
    elif kind == "duration":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected a duration such as \"30s\" or \"5d\", got {_describe(value)}")
        # TOML has inf and nan floats, and nan would also pass every min and max check.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"invalid duration {value}; expected finite seconds or a string such as \"5d\"")
        negative = value < 0 if not isinstance(value, str) else value.strip().startswith("-")
        if options.get("positive") and negative:
            # parse_duration's message asks for "0 or more", which is wrong for these keys.
            raise ValueError(f"value {value!r} must be above 0; give a duration such as \"30s\"")
        converted = parse_duration(value)
        if options.get("positive") and converted <= 0:
            raise ValueError(f"value {value!r} must be above 0; give a duration such as \"30s\"")
    elif kind == "choice":
        _expect(value, (str,), "a string")
        choices = options["choices"]
        if value not in choices:
            raise ValueError(f"invalid value {value!r}; expected one of: {', '.join(choices)}")
        return value
    elif kind == "hostname":
        _expect(value, (str,), "a host name")
        if len(value.encode()) > MAX_HOSTNAME_OCTETS:
            raise ValueError(
                f"host name of {len(value.encode())} octets is too long; a DNS name has at most"
                f" {MAX_HOSTNAME_OCTETS} octets"
            )
        problem = hostname_problem(value)
        if problem is not None:
            raise ValueError(
                f"invalid host name {value!r}: {problem}; expected a DNS name such as \"mx.example.test\""
            )
        return value
    elif kind == "hostport":
        _expect(value, (str,), "a string such as \"127.0.0.1:2525\"")
        return parse_host_port(value)
    elif kind == "optional_hostport":
        _expect(value, (str,), "a string such as \"127.0.0.1:9025\", or \"\" for off")
        if value:
            parse_host_port(value)
        return value
    elif kind == "hostports":
        _expect_items(value, (str,), "an array of \"HOST:PORT\" strings")
        result = []
        for item in value:
            host, port = parse_host_port(item, options.get("default_port"))
            if options.get("addresses_only") and not _is_ip_address(host):
                raise ValueError(
                    f"{item!r} is not an IP address; relay does not look up its nameservers by name,"
                    " so give addresses such as \"127.0.0.1:53\" or \"[::1]:53\""
                )
            result.append((host, port))
        return tuple(result)
    elif kind == "path":
        _expect(value, (str,), "a file or directory path")
        # The operating system ends a path at its first NUL, so Python's os
        # functions reject such a path: os.path.exists() returns False and
        # open() raises ValueError, far from the key that named it.
        if "\0" in value:
            raise ValueError(f"path {_value_repr.repr(value)} contains a NUL character; remove it")
        if not value.strip() and options.get("required"):
            raise ValueError("empty path; give a directory")
        path = ctx.resolve(value)
        if path and options.get("must_exist"):
            # Every key that names an existing path names a file.
            if not os.path.exists(path):
                raise ValueError(f"file {path} not found; create it or fix the path")
            if os.path.isdir(path):
                raise ValueError(f"{path} is a directory; give the path of a file")
        return path
    elif kind == "strings":
        _expect_items(value, (str,), "an array of strings")
        return tuple(value)
    elif kind == "users":
        _expect_items(value, (str,), "an array of user names")
        for name in value:
            if not is_safe_user_name(name):
                raise ValueError(
                    f"invalid user name {name!r}; expected letters, digits and . _ + = -,"
                    " without a leading dot, \"..\" or \"/\", at most 255 characters"
                )
        return tuple(value)
    elif kind == "domains":
        return _parse_domains(value)
    elif kind == "networks":
        return _parse_networks(value)
    elif kind == "relayhost":
        return _parse_relayhost(value)
    elif kind == "transport":
        return _parse_transport(value)
    else:
        raise AssertionError(f"unknown config kind {kind}")

    # Integers without a maximum of their own still must fit the C integers of the
    # compiled core and the system calls they reach, and durations the timeouts of those calls.
    ceiling = _DURATION_CEILING if kind == "duration" else _INTEGER_CEILING
    low, high = options.get("min"), options.get("max", ceiling)
    format_limit = format_duration if kind == "duration" else str
    if low is not None and converted < low:
        raise ValueError(f"value {value!r} is below the minimum {format_limit(low)}")
    if high is not None and converted > high:
        raise ValueError(f"value {value!r} is above the maximum {format_limit(high)}")
    return converted


def _suggestion(name: str, known: Iterable[str]) -> str:
    """Return " (did you mean NAME?)" for the known name closest to a misspelled one, or ""."""
    matches = difflib.get_close_matches(name.lower(), list(known), n=1)
    return f" (did you mean {matches[0]}?)" if matches else ""


def directory_problem(path: str) -> str | None:
    """Return why the spool or Maildir root directory ``path`` cannot be opened or created, or None.

    A missing directory is fine, because relay serve creates the spool, and
    local delivery each Maildir, with their parents.  A file at the path or
    at one of its parents is a problem.
    """
    for candidate in (Path(path), *Path(path).parents):
        if not os.path.exists(candidate):
            continue
        if candidate.is_dir():
            return None
        if str(candidate) == path:
            return f"{path} is not a directory; give a directory"
        return f"{candidate} is not a directory, so {path} cannot be created; give a directory"
    return None


# Kernel filesystems in which no process can create a directory, root included.
# NOTE: only these are known, so a spool under another such filesystem passes
# check-config and fails only when relay serve opens it.
_NO_MKDIR_FILESYSTEMS = frozenset({"proc", "sysfs", "devpts"})


def spool_directory_problem(path: str) -> str | None:
    """Return why ``relay serve`` could not create or write the spool directory ``path``, or None.

    Checks the nearest existing directory without creating anything: that
    it is a directory, that this user may write it, and that its filesystem
    allows new directories.  The check uses this process's user, so run it
    as the user that runs ``relay serve``.
    """
    problem = directory_problem(path)
    if problem is not None:
        return problem
    target = Path(path)
    existing = next((candidate for candidate in (target, *target.parents) if os.path.exists(candidate)), None)
    if existing is None:
        return None
    user = effective_user()
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == target:
            return f"permission denied on {path}; let user {user} write it, or give another directory"
        return (
            f"permission denied on {existing}, so {path} cannot be created;"
            f" let user {user} write {existing}, or give another directory"
        )
    filesystem = _filesystem_type(existing)
    if existing != target and filesystem in _NO_MKDIR_FILESYSTEMS:
        return (
            f"{existing} is on a {filesystem} filesystem, which allows no new directories, so {path}"
            " cannot be created; give a directory on a disk filesystem"
        )
    return None


def _filesystem_type(path: Path) -> str | None:
    """Return the type of the filesystem that contains ``path``, read from /proc/self/mountinfo, or None."""
    try:
        device = os.stat(path).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    device_number = f"{os.major(device)}:{os.minor(device)}"
    for line in lines:
        fields = line.split()
        # The third field is the device as major:minor, and the type follows the "-" field.
        if len(fields) > 2 and fields[2] == device_number and "-" in fields[3:]:
            separator = fields.index("-", 3)
            if separator + 1 < len(fields):
                return fields[separator + 1]
    return None


# The start of an error about one config key, such as "delivery.tls_ca_file: " or "listener[1].address: ".
_KEY_PREFIX = re.compile(r"([a-z_]+(?:\[\d+\])?\.[a-z_]+): ")

# The options of relay serve that replace a config value, by the key of that value.
OVERRIDE_OPTIONS: Mapping[str, str] = MappingProxyType({
    "listener": "--listen",
    "spool.path": "--spool",
    "server.workers": "--workers",
    "delivery.enabled": "--no-delivery",
})


def locate_error(config: Config, error: str, command: str = "relay serve") -> str:
    """Prefix ``error`` about a config value ("section.key: problem") with where the value came from.

    A value from the config file gives "FILE:section.key: problem", the form
    of load_config and ``relay check-config``, and a built-in default names
    the file ``<defaults>`` as load_config does.  A value that a
    command-line option replaced gives "relay serve: --spool: problem".  An
    error without a key is about the file as a whole: "FILE: problem".
    """
    source = config.source or "<defaults>"
    match = _KEY_PREFIX.match(error)
    if match is None:
        return f"{source}: {error}"
    key = match.group(1)
    # "listener[1].address" comes from --listen, which replaces every listener.
    setting = key.partition("[")[0]
    if setting in config.overrides and setting in OVERRIDE_OPTIONS:
        return f"{command}: {OVERRIDE_OPTIONS[setting]}: {error[match.end():]}"
    return f"{source}:{error}"


def _parse_section(cls: type, raw: Any, name: str, ctx: _Context) -> Any:
    """Build one section dataclass from its TOML table, recording errors in ctx."""
    if not isinstance(raw, dict):
        ctx.error(name, f"expected a table, got {_describe(raw)}")
        ctx.invalid.add(name)
        return cls()

    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata}
    values: dict[str, Any] = {}
    # Default paths are relative to the directory relay runs in, so that the
    # defaults-only relay keeps ./relay-spool and ./mail where it was started.
    for default_field in fields.values():
        default = default_field.default
        if default_field.metadata["kind"] == "path" and isinstance(default, str) and default:
            values[default_field.name] = str(Path.cwd() / default)
    for key, value in raw.items():
        spec = fields.get(key)
        if spec is None:
            known = ", ".join(sorted(fields))
            ctx.error(f"{name}.{key}", f"unknown key{_suggestion(key, fields)}; expected one of: {known}")
            continue
        try:
            values[key] = _convert(spec.metadata["kind"], value, spec.metadata, ctx)
        except ValueError as exc:
            ctx.error(f"{name}.{key}", str(exc))
            ctx.invalid.add(f"{name}.{key}")
    return cls(**values)


def _check_conflicts(config: Config, ctx: _Context, raw_tls: bool) -> None:
    """Record settings that are valid alone but not together.

    A key whose value was invalid counts as set, because it was already reported
    and the default that replaced it would only cause follow-on errors.
    """
    seen: dict[tuple[str, int], int] = {}
    cert_set = bool(config.tls.cert) or ctx.is_invalid("tls.cert")
    key_set = bool(config.tls.key) or ctx.is_invalid("tls.key")
    for index, listener in enumerate(config.listeners):
        key = f"listener[{index}]"
        if not ctx.is_invalid(f"{key}.address"):
            if listener.address in seen:
                first = seen[listener.address]
                ctx.error(f"{key}.address", f"{listener.address_text} is already used by listener[{first}]")
            seen.setdefault(listener.address, index)
        if listener.tls != "none" and not (cert_set and key_set):
            message = f"tls = \"{listener.tls}\" needs [tls] cert and key; add them or set tls = \"none\""
            ctx.error(f"{key}.tls", message)
    if raw_tls and cert_set != key_set:
        missing = "key" if cert_set else "cert"
        ctx.error(f"tls.{missing}", "missing; [tls] needs both cert and key")

    delivery = config.delivery
    password_file_set = bool(delivery.relayhost_password_file) or ctx.is_invalid("delivery.relayhost_password_file")
    relayhost_set = bool(delivery.relayhost) or ctx.is_invalid("delivery.relayhost")
    if delivery.relayhost_username and not password_file_set:
        ctx.error("delivery.relayhost_password_file", "missing; relayhost_username needs a password file")
    if delivery.relayhost_username and not relayhost_set:
        ctx.error("delivery.relayhost_username", "set but delivery.relayhost is empty; set a relayhost or remove it")

    if not (ctx.is_invalid("delivery.minimal_backoff_time") or ctx.is_invalid("delivery.maximal_backoff_time")):
        if delivery.maximal_backoff_time < delivery.minimal_backoff_time:
            ctx.error(
                "delivery.maximal_backoff_time",
                f"{format_duration(delivery.maximal_backoff_time)} is below minimal_backoff_time"
                f" ({format_duration(delivery.minimal_backoff_time)}); raise it or lower the minimum",
            )

    if not (ctx.is_invalid("policy.local_domains") or ctx.is_invalid("policy.relay_domains")):
        overlap = set(config.policy.local_domains) & set(config.policy.relay_domains)
        for domain in sorted(overlap):
            ctx.error("policy.relay_domains", f"{domain!r} is also in policy.local_domains; list it in one only")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file, or return the defaults when path is None.

    Raises ConfigError listing every problem found.
    """
    if path is None:
        ctx = _Context("<defaults>", Path.cwd())
        return _build({}, ctx, None)

    filename = str(path)
    ctx = _Context(filename, Path(filename).resolve().parent)
    try:
        with open(filename, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ConfigError([f"{filename}: file not found; pass an existing config file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{filename}: is a directory; pass the path of the config file"]) from None
    except PermissionError:
        user = effective_user()
        raise ConfigError([f"{filename}: cannot be read: permission denied; let user {user} read it"]) from None
    except OSError as exc:
        raise ConfigError([f"{filename}: cannot be read: {exc.strerror}"]) from None
    # Decoded here rather than by tomllib.load, which lets UnicodeDecodeError escape.
    # Some editors write a byte-order mark, which tomllib would report as an
    # invalid statement at line 1.
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([_describe_utf8_error(filename, data, exc)]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_describe_toml_error(filename, text, exc)]) from None
    except ValueError:
        # tomllib (Python 3.11) lets int()'s limit of 4300 digits escape as a plain ValueError.
        raise ConfigError([_describe_long_integer(filename, text)]) from None
    return _build(raw, ctx, filename)


def effective_user() -> str:
    """Return the name of the user this process runs as, or its uid when it has no name."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def read_error(path: str, exc: OSError) -> str:
    """Return "cannot read PATH: REASON" for a file named in the config, with the fix for permission denied."""
    if isinstance(exc, PermissionError):
        return f"cannot read {path}: permission denied; let user {effective_user()} read it"
    return f"cannot read {path}: {exc.strerror or exc}"


# The position that tomllib (Python 3.11) puts at the end of its messages.
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)$")
# How to fix the tomllib errors whose message does not say it, by message start.
_TOML_FIXES = {
    "Cannot overwrite a value": "a key may appear only once in a table, so remove one of them",
    "Cannot declare": "a [section] may appear only once, so merge the two",
}


def _describe_toml_error(filename: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    """Return the error line for a TOML syntax error, quoting the line it names."""
    message = str(exc)
    result = f"{filename}: invalid TOML: {message}"
    position = _TOML_POSITION.search(message)
    # tomllib counts only LF as a line end, while str.splitlines also splits at
    # characters that TOML allows in comments and strings, such as U+2028.
    lines = text.split("\n")
    if position is not None and 0 < int(position.group(1)) <= len(lines):
        result += f": {_value_repr.repr(lines[int(position.group(1)) - 1].strip())}"
    fix = next((fix for start, fix in _TOML_FIXES.items() if message.startswith(start)), None)
    if fix is not None:
        result += f"; {fix}"
    return result


def _describe_long_integer(filename: str, text: str) -> str:
    """Return the error line for a TOML integer too long for Python to read, naming its line."""
    limit = sys.get_int_max_str_digits()
    digits = re.search(f"[0-9A-Fa-f_]{{{limit + 1},}}", text)
    where = ""
    if digits is not None:
        line = text.count("\n", 0, digits.start()) + 1
        where = f" at line {line}"
    return (
        f"{filename}: invalid TOML: integer{where} has more than {limit} digits;"
        f" no key accepts more than {len(str(_INTEGER_CEILING))} digits"
    )


def _describe_utf8_error(filename: str, data: bytes, exc: UnicodeDecodeError) -> str:
    """Return the error line for a config file that is not UTF-8, naming the first bad byte."""
    line = data.count(b"\n", 0, exc.start) + 1
    return (
        f"{filename}: not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line});"
        " TOML files must be UTF-8, so convert the file, for example with iconv -f latin1 -t utf-8"
    )


def _build(raw: dict[str, Any], ctx: _Context, source: str | None) -> Config:
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "listener":
            continue
        cls = _SECTIONS.get(key)
        if cls is None:
            ctx.error(key, _unknown_top_level(key, value))
            continue
        sections[key] = _parse_section(cls, value, key, ctx)

    for name, cls in _SECTIONS.items():
        if name not in sections:
            sections[name] = _parse_section(cls, {}, name, ctx)

    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    if "listener" in raw:
        raw_listeners = raw["listener"]
        if not isinstance(raw_listeners, list) or not raw_listeners:
            ctx.error("listener", "expected one or more [[listener]] tables")
        else:
            listeners = tuple(
                _parse_section(ListenerConfig, item, f"listener[{index}]", ctx)
                for index, item in enumerate(raw_listeners)
            )

    config = Config(listeners=listeners, source=source, **sections)
    _check_conflicts(config, ctx, "tls" in raw)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return config


def _unknown_top_level(name: str, value: Any) -> str:
    """Return the error for a top-level name that is no section: a misspelled section, or a key above the first one."""
    known = ", ".join(sorted([*_SECTIONS, "listener"]))
    if isinstance(value, dict):
        return f"unknown section{_suggestion(name, [*_SECTIONS, 'listener'])}; expected one of: {known}"
    # In TOML a key belongs to the table whose header it follows, so a key
    # that parses as top-level is written above every [section] header.
    sections = {**_SECTIONS, "listener": ListenerConfig}
    owners = [
        f"[[{section}]]" if section == "listener" else f"[{section}]"
        for section, cls in sorted(sections.items())
        if name in {spec.name for spec in dataclasses.fields(cls)}
    ]
    if owners:
        return f"key before any [section] header; move it into {' or '.join(owners)}"
    return f"unknown key before any [section] header; expected a section: {known}"


def config_warnings(config: Config) -> list[tuple[str, str]]:
    """Return the settings that are valid but unsafe, as (``section.key``, problem) pairs."""
    warnings = []
    delivery = config.delivery
    if delivery.relayhost_username and delivery.relayhost_tls == "opportunistic":
        # Opportunistic TLS verifies no certificate, so anyone on the path can
        # pose as the smart host and read the PLAIN or LOGIN password.
        warnings.append((
            "delivery.relayhost_tls",
            '"opportunistic" with relayhost_username sends the password over TLS without a verified'
            ' certificate, so a man in the middle can collect it; set relayhost_tls = "required"'
            " (and tls_ca_file for a private CA)",
        ))
    return warnings


def describe_defaults() -> dict[str, dict[str, Any]]:
    """Return every section's keys with their default values, for docs and tests."""
    result: dict[str, dict[str, Any]] = {}
    for name, cls in [*_SECTIONS.items(), ("listener", ListenerConfig)]:
        instance = cls()
        result[name] = {f.name: getattr(instance, f.name) for f in dataclasses.fields(cls) if f.metadata}
    return result

