"""Relay access and recipient checks made at RCPT time.

Rules, in order (the first that applies decides):

1. An address literal domain (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) is
   rejected ``550 5.7.1`` unless ``policy.allow_address_literals`` is on, and
   always when it points at a loopback, link-local, unspecified, multicast or
   reserved address (``is_internal_address``, which also judges an
   IPv4-mapped IPv6 address by its IPv4 address), so a client cannot steer
   the relay at internal hosts.
   An allowed literal is then treated like any remote domain (rule 4).
2. A domain in ``policy.local_domains``: the local part must name a user
   (a directory under ``local.maildir_root``, an entry of ``local.users`` or
   an alias in the ``local.aliases`` file); ``postmaster`` always exists
   (RFC 5321 section 4.5.1).  Otherwise ``550 5.1.1``.  Anyone may send here.
   When the folder lookup fails for a reason other than a missing folder
   (``maildir_root`` is a file, cannot be searched, or is a symlink loop),
   the user may exist, so the reply is ``451 4.3.0`` (LOCAL_ERROR) and the
   client tries again later.  The reply does not name the path.  The cause
   goes to the log as a ``recipient_lookup_error`` warning, at most once in
   LOOKUP_ERROR_LOG_INTERVAL seconds per process, with the count of
   failures since the previous one.  Postfix's smtpd (``smtpd_check.c``)
   likewise defers, not rejects, a recipient whose table lookup fails.
3. A domain in ``policy.relay_domains``: accepted from anyone.
4. Any other domain: accepted only from ``policy.trusted_networks`` or an
   authenticated client, else ``554 5.7.1 Relay access denied``.

A relay domain or other domain that ``[delivery.transport]`` routes to
``"local"`` goes to the same Maildirs as a local domain, so once rule 3 or
4 accepts it, its local part must also name a user as in rule 2.  Otherwise
delivery would bounce the message with ``5.1.1`` after RCPT accepted it.

A quoted local part that would also be valid unquoted (``"rcpt"``) names
the same mailbox as its unquoted form (RFC 5321 section 4.1.2), so the
session turns it into that form before any check (``dot_string_form``), as
Postfix turns addresses into its unquoted internal form.  A local part that
needs its quotes (``"a b"``, ``"info@"``) is kept as sent.

Domains match exactly, case-insensitively; subdomains are not implied.
User names match case-insensitively: local delivery folds the local part
to lower case, as Postfix's local(8) does, so a Maildir directory must exist
under the lower-cased local part.  A directory with upper-case letters in its
name never matches.  Local parts that could name a path outside the root
(``/``, a leading ``.``) never match a directory.
"""

from __future__ import annotations

import ipaddress
import logging
import re

from relay.aliases import DEFAULT_EXPANSION_LIMIT, MAX_ALIAS_DEPTH, AliasFile
from relay.config import Config
from relay.delivery.maildir import MaildirLookupError, maildir_exists
from relay.delivery.router import is_internal_address
from relay.log import RepeatCounter, log_event
from relay.smtp import replies
from relay.smtp.replies import Reply
from relay.units import is_safe_user_name

logger = logging.getLogger("relay.smtp")


class _AliasFile(AliasFile):
    """The aliases file as RCPT reads it: re-read when it changes, errors logged by ``relay.smtp``."""

    def __init__(self, path: str, expansion_limit: int = DEFAULT_EXPANSION_LIMIT) -> None:
        super().__init__(path, logger, expansion_limit)


def address_literal_ip(domain: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the address of a ``[...]`` literal domain, or None if domain is not one."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].upper() == "IPV6:":
        return ipaddress.IPv6Address(inner[5:])
    return ipaddress.IPv4Address(inner)


# RFC 5321 Dot-string: atoms of atext joined by single dots.  RFC 6531
# section 3.3 adds every non-ASCII character to atext.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_QUOTED_PAIR = re.compile(r"\\(.)")


def dot_string_form(local_part: str) -> str:
    """Return a quoted local part without its quotes when the result is a valid Dot-string.

    ``"rcpt"`` and ``"r\\cpt"`` become ``rcpt``.  Any other local part,
    quoted or not, is returned unchanged.
    """
    if len(local_part) < 2 or local_part[0] != '"' or local_part[-1] != '"':
        return local_part
    content = _QUOTED_PAIR.sub(r"\1", local_part[1:-1])
    return content if _DOT_STRING.fullmatch(content) else local_part


# Addresses whose trust decision is remembered; 10,000 short strings take about 1 MB.
TRUSTED_CACHE_SIZE = 10_000
# A maildir_root that cannot be read fails every RCPT that looks up a folder,
# so its warning is logged at most once in this many seconds, with the count
# of failures.  Each failed RCPT still gets its own reject line from the session.
LOOKUP_ERROR_LOG_INTERVAL = 60.0


class RelayPolicy:
    """Decide whether one client may send to one recipient."""

    def __init__(self, config: Config, *, accept_on_lookup_error: bool = False) -> None:
        """Read the policy from ``config``.

        ``accept_on_lookup_error`` accepts, without a log line, a local
        recipient whose Maildir folder cannot be looked up, in place of
        LOCAL_ERROR.  ``relay sendmail`` sets it: its caller may not search
        maildir_root, and delivery, which runs as the relay's user, decides.
        """
        policy = config.policy
        self.local_domains = frozenset(d.lower() for d in policy.local_domains)
        self.relay_domains = frozenset(d.lower() for d in policy.relay_domains)
        self.trusted_networks = tuple(ipaddress.ip_network(n) for n in policy.trusted_networks)
        self.allow_address_literals = policy.allow_address_literals
        self.maildir_root = config.local.maildir_root
        self.users = frozenset(u.lower() for u in config.local.users)
        self.local_transport_domains = frozenset(
            domain for domain, route in config.delivery.transport.items() if route == "local"
        )
        self._aliases = _AliasFile(config.local.aliases, config.local.alias_expansion_limit)
        # Client address -> is_trusted result; parsing the address costs more than
        # the rest of a connection's setup.  Cleared when it reaches the bound.
        self._trusted: dict[str, bool] = {}
        self.accept_on_lookup_error = accept_on_lookup_error
        self._lookup_failures = RepeatCounter(LOOKUP_ERROR_LOG_INTERVAL)

    def is_trusted(self, address: str) -> bool:
        """Return whether a client IP address is in a trusted network."""
        trusted = self._trusted.get(address)
        if trusted is None:
            if len(self._trusted) >= TRUSTED_CACHE_SIZE:
                self._trusted.clear()
            trusted = self._trusted[address] = self._check_trusted(address)
        return trusted

    def _check_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted_networks)

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.local_domains

    def user_exists(self, local_part: str) -> bool:
        """Return whether a local part names a local user, postmaster, or an alias that delivery can expand.

        Raises MaildirLookupError when a folder under maildir_root cannot be
        looked up and nothing else shows that the name leads somewhere.
        """
        lowered = local_part.lower()
        if lowered == "postmaster" or lowered in self.users:
            return True
        table = self._aliases.table()
        if lowered in table:
            # An alias that leads to no mailbox and no address would be accepted
            # here and then bounced by delivery (backscatter), so it counts only
            # when delivery would find somewhere to put the message.
            return self._alias_leads_somewhere(table, lowered, set(), 0)
        return self._has_mailbox(local_part)

    def _has_mailbox(self, local_part: str) -> bool:
        if not self.maildir_root or not is_safe_user_name(local_part):
            return False
        # Only the lower-cased name, because that is the folder delivery writes to.
        return maildir_exists(self.maildir_root, local_part.lower())

    def _alias_leads_somewhere(
        self, table: dict[str, tuple[str, ...]], name: str, seen: set[str], depth: int
    ) -> bool:
        """Return whether expanding alias ``name`` reaches an address or a user with a mailbox.

        The same walk as delivery's expansion: at most MAX_ALIAS_DEPTH levels deep.
        A target whose folder cannot be looked up does not stop the walk,
        because a later target may decide.  Its MaildirLookupError is raised
        only when no target leads anywhere.
        """
        if name in seen or depth > MAX_ALIAS_DEPTH:
            return False
        seen.add(name)
        failure: MaildirLookupError | None = None
        for target in table[name]:
            if "@" in target:
                return True
            lowered = target.lower()
            try:
                if lowered != name and lowered in table:
                    if self._alias_leads_somewhere(table, lowered, seen, depth + 1):
                        return True
                elif lowered == "postmaster" or lowered in self.users or self._has_mailbox(target):
                    return True
            except MaildirLookupError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return False

    def _local_user_reply(self, local_part: str) -> Reply | None:
        """Return NO_SUCH_USER for an unknown local user, LOCAL_ERROR when the lookup fails, else None."""
        try:
            return None if self.user_exists(local_part) else replies.NO_SUCH_USER
        except MaildirLookupError as exc:
            if self.accept_on_lookup_error:
                return None
            self._note_lookup_error(exc)
            return replies.LOCAL_ERROR

    def _note_lookup_error(self, error: MaildirLookupError) -> None:
        """Count a failed lookup; log it at most once in LOOKUP_ERROR_LOG_INTERVAL seconds."""
        failures = self._lookup_failures.note()
        if failures is not None:
            log_event(logger, "recipient_lookup_error", logging.WARNING, error=str(error), failures=failures)

    def check_recipient(self, local_part: str, domain: str, privileged: bool) -> Reply | None:
        """Return the rejection for a recipient, or None to accept it.

        ``privileged`` is true for trusted-network and authenticated clients.
        ``domain`` is empty only for ``<postmaster>``, which is always local.
        """
        if domain == "":
            return None
        try:
            literal = address_literal_ip(domain)
        except ValueError:
            return replies.BAD_RECIPIENT_SYNTAX
        if literal is not None:
            if not self.allow_address_literals or is_internal_address(literal):
                return replies.ADDRESS_LITERAL_DENIED
            return None if privileged else replies.RELAY_DENIED

        name = domain.lower().rstrip(".")
        if name in self.local_domains:
            return self._local_user_reply(local_part)
        if not privileged:
            if name not in self.relay_domains:
                return replies.RELAY_DENIED
            # Sender-specified routing (user%host@relay-domain, host!user@...):
            # a next hop that honours it would relay for anyone, so only
            # privileged clients may use it, as Postfix's allow_untrusted_routing.
            if any(mark in local_part for mark in "%!@"):
                return replies.RELAY_DENIED
        if name in self.local_transport_domains:
            return self._local_user_reply(local_part)
        return None

