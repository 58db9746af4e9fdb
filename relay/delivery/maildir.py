"""Local delivery: append messages to Maildir mailboxes, after alias expansion.

Each local user has a Maildir at ``[local] maildir_root/USER``.  A user
exists when that directory exists, when the name is in ``[local] users``, or
when the name is ``postmaster`` (RFC 5321 section 4.5.1 requires it).  User
names are compared in lower case.  A lookup that fails for a reason other
than a missing folder (``maildir_root`` is a file, or cannot be searched)
defers the delivery with ``4.3.0`` and the cause, because the user may exist.

Delivery prepends ``Return-Path: <sender>`` (RFC 5322 section 3.6.7) and
``Delivered-To: recipient`` and then writes the message with LF line ends,
as Postfix's local(8) writes Maildir files and mail readers expect: each
CRLF of the SMTP form becomes LF.  A BINARYMIME body (RFC 3030) is written
unchanged, headers included, because a CRLF inside it may be data.
The file is written under ``tmp/``, flushed to disk with fsync, hard-linked
into ``new/`` and removed from ``tmp/``, and the ``new/`` directory is
fsynced, so a delivered message survives a crash.  A link, unlike a rename,
fails when the name already exists in ``new/``, so a name clash takes a new
name instead of replacing a message (see ``_link_into``).  A folder that delivery creates (the user's Maildir and
its ``tmp/``, ``new/`` and ``cur/``, mode 0700) is made durable the same
way, by an fsync of the folder that holds it, because a new file is only
as durable as the chain of folders leading to it.  The standard library's ``mailbox.Maildir.add`` does the
same move but no fsync, so it is not used for writing.

Aliases come from ``[local] aliases``, parsed and checked by
``relay.aliases``.  A target without ``@`` is a local user or another alias;
one with ``@`` is any address, routed again.  Expansion stops at a name it
has seen and after ``MAX_ALIAS_DEPTH`` levels.  A file that ``parse_aliases``
accepted has no loop and no deeper chain, so neither stop drops a target.
A member that is neither an alias nor a user becomes an address in the
recipient's domain (``Expansion.unknown``), so that delivery forwards it
and its failure bounces, instead of skipping it.
An expansion to more than ``[local] alias_expansion_limit`` users and
addresses raises ExpansionLimitError, which such a file cannot have either.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from relay.aliases import MAX_ALIAS_DEPTH, AliasFile, checked_table, parse_aliases
from relay.config import LocalConfig
from relay.units import is_safe_user_name

logger = logging.getLogger("relay.delivery")

_counter = itertools.count()

# Names that one delivery tries in new/ before it fails with a clash.  Each
# try takes a new counter value, so only a file placed there by some other
# program can clash more than once.
_LINK_ATTEMPTS = 5


class UnknownUser(LookupError):
    """No mailbox and no alias exists for a local address."""


class ExpansionLimitError(Exception):
    """An alias expands to more users and addresses than ``[local] alias_expansion_limit`` allows."""


class MaildirLookupError(OSError):
    """A user's folder under ``maildir_root`` cannot be looked up, so whether the user exists is unknown."""


def maildir_exists(root: str, user: str) -> bool:
    """Return whether ``root/user`` is a folder; ``user`` is a lower-cased name that is_safe_user_name accepts.

    Delivery and the RCPT check both call this, so they agree on who exists.
    Raises MaildirLookupError when the folder cannot be looked up for a reason
    other than its absence, such as a maildir_root that cannot be searched.
    """
    try:
        return stat.S_ISDIR(os.stat(os.path.join(root, user)).st_mode)
    except FileNotFoundError:
        return False
    except OSError as exc:
        # Path.is_dir returns False for ENOTDIR (a maildir_root that is a file), so
        # every user would look unknown and their mail would bounce.  This, EACCES
        # and ELOOP are errors of this host that the operator can fix, so the
        # callers defer instead.
        cause = exc.strerror or str(exc)
        raise MaildirLookupError(f"cannot read maildir_root {root} for user {user}: {cause}") from exc


@dataclass(frozen=True, slots=True)
class Expansion:
    """The destinations of a local address: local mailboxes and remote addresses."""

    users: tuple[str, ...] = ()
    remote: tuple[str, ...] = ()
    # The addresses in ``remote`` made from alias members that are neither an
    # alias nor a user: ghost@ the recipient's domain for "team: alice, ghost"
    # while maildir_root/ghost is missing.
    unknown: tuple[str, ...] = ()




@dataclass
class LocalDelivery:
    """Deliver to the Maildirs under one root, resolving aliases first."""

    config: LocalConfig
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The aliases file, read again when it changes; None: ``aliases`` as given.
    source: AliasFile | None = None

    @classmethod
    def from_config(cls, config: LocalConfig) -> LocalDelivery:
        """Load the aliases file named in ``config``; raise AliasError (a ValueError) for an invalid file.

        Later changes to the file take effect at the next expansion, as they
        do at RCPT, so an alias that RCPT accepted is known here too.
        """
        if not config.aliases:
            return cls(config)
        # The version the config check read, or parsed here to raise for an invalid
        # file, which AliasFile would only log.
        aliases = checked_table(config.aliases)
        if aliases is None:
            aliases = parse_aliases(Path(config.aliases).read_text(encoding="utf-8"), config.alias_expansion_limit)
        return cls(config, aliases, AliasFile(config.aliases, logger, config.alias_expansion_limit))

    def table(self) -> dict[str, tuple[str, ...]]:
        """Return the aliases in force now."""
        return self.source.table() if self.source is not None else self.aliases

    def user_exists(self, user: str) -> bool:
        """Return whether ``user`` has a mailbox (existing, configured, or postmaster).

        Raises MaildirLookupError when the folder cannot be looked up for a reason
        other than its absence, such as a maildir_root that cannot be searched.
        """
        name = user.lower()
        # A transport entry "local" sends any local part of its domain here, and
        # a name from the config or the aliases must not leave maildir_root either.
        if not is_safe_user_name(name):
            return False
        if name == "postmaster" or name in (u.lower() for u in self.config.users):
            return True
        return maildir_exists(self.config.maildir_root, name)

    def expand(self, local_part: str, domain: str = "") -> Expansion:
        """Resolve a local part through the aliases; raise UnknownUser when it leads nowhere.

        An alias member that is not a user becomes the address ``member@domain``
        (the bare member without ``domain``), listed in ``remote`` and in
        ``unknown``, so that its delivery fails and bounces.  When no member
        is a user or an address, the alias leads nowhere and UnknownUser is
        raised instead.

        Raises MaildirLookupError (an OSError) when a user's folder cannot be looked up,
        and ExpansionLimitError when the expansion passes ``alias_expansion_limit``.
        """
        users: list[str] = []
        remote: list[str] = []
        unknown: list[str] = []
        name = local_part.lower()
        self._expand(self.table(), name, users, remote, unknown, set(), 0)
        configured = name == "postmaster" or name in (u.lower() for u in self.config.users)
        if not users and not remote and configured and self.user_exists(name):
            # postmaster must always be deliverable (RFC 5321 section 4.5.1), and
            # RCPT accepts configured users whatever their alias lists.
            users.append(name)
        if not users and not remote:
            raise UnknownUser(local_part)
        addresses = [f"{member}@{domain}" if domain else member for member in dict.fromkeys(unknown)]
        # An address that the alias also lists as a target is forwarded once, as that target.
        addresses = [address for address in addresses if address not in remote]
        expansion = Expansion(
            tuple(dict.fromkeys(users)), tuple(dict.fromkeys([*remote, *addresses])), tuple(addresses)
        )
        # parse_aliases rejects a file with such an alias, so only a table that
        # no check with this limit saw gets here.
        size = len(expansion.users) + len(expansion.remote)
        if size > self.config.alias_expansion_limit:
            raise ExpansionLimitError(
                f"alias {name} expands to {size} users and addresses, more than the"
                f" {self.config.alias_expansion_limit} that local.alias_expansion_limit allows"
            )
        return expansion

    def _expand(
        self,
        aliases: dict[str, tuple[str, ...]],
        name: str,
        users: list[str],
        remote: list[str],
        unknown: list[str],
        seen: set[str],
        depth: int,
    ) -> None:
        if name in seen or depth > MAX_ALIAS_DEPTH:
            return
        seen.add(name)
        targets = aliases.get(name)
        if targets is None:
            if self.user_exists(name):
                users.append(name)
            elif depth > 0:
                # A member of an alias, not the address being expanded.
                unknown.append(name)
            return
        for target in targets:
            if "@" in target:
                remote.append(target)
            elif target.lower() == name:
                # An alias naming itself means its own mailbox, as in Postfix
                # and sendmail: "carol: carol, copy@elsewhere".  The line
                # declares that mailbox, so delivery creates its Maildir.
                if is_safe_user_name(name):
                    users.append(name)
            else:
                self._expand(aliases, target.lower(), users, remote, unknown, seen, depth + 1)

    def deliver(self, user: str, sender: str, recipient: str, body: bytes, *, binary: bool = False) -> Path:
        """Write one message into ``user``'s Maildir ``new/`` durably; return the file's path.

        ``binary`` keeps the body's CRLF line ends (a BINARYMIME body).
        Raises ValueError for a user name that is not a safe folder name.
        """
        if not is_safe_user_name(user):
            raise ValueError(f"invalid local user name {user!r}")
        # NOTE: a symbolic link at maildir_root/USER, or at its tmp/ or new/, is
        # followed even when it leads out of maildir_root, while relay mailbox
        # skips linked tmp/, new/ and cur/ folders.
        root = Path(self.config.maildir_root) / user.lower()
        # A user exists once maildir_root/USER exists, possibly still empty, and
        # mailbox.Maildir creates the folders only for a missing root, so make them here.
        for folder in ("tmp", "new", "cur"):
            _make_durable_folders(root / folder)
        line_end = "\r\n" if binary else "\n"
        header = f"Return-Path: <{sender}>{line_end}Delivered-To: {recipient}{line_end}".encode()
        if not binary:
            body = body.replace(b"\r\n", b"\n")
        temporary = root / "tmp" / _unique_name()
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(header)
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            final = _link_into(temporary, root / "new")
        except OSError as exc:
            if exc.filename is not None:
                raise
            # A failed write or fsync (ENOSPC, EDQUOT, EIO) names no file, and
            # the deferral reply and log line must show which Maildir failed.
            raise OSError(exc.errno, exc.strerror, str(temporary)) from exc
        finally:
            # After a failed write no partial message is left behind, and after
            # the link the message is in new/ and this name is no longer needed.
            temporary.unlink(missing_ok=True)
        _fsync_directory(root / "new")
        return final


def unknown_alias_members(config: LocalConfig, aliases: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """Return ``(alias, member)`` for each local member that is neither an alias nor a user now, in file order.

    Delivery bounces these members (see ``LocalDelivery.expand``).  A member
    whose folder cannot be looked up is left out, because it may exist.
    """
    local = LocalDelivery(config, aliases)
    found: list[tuple[str, str]] = []
    for alias, targets in aliases.items():
        for target in targets:
            member = target.lower()
            if "@" in target or member == alias or member in aliases:
                continue
            try:
                if not local.user_exists(member):
                    found.append((alias, member))
            except MaildirLookupError:
                continue
    return found


def _unique_name() -> str:
    # The classic Maildir form: seconds, then microseconds, process and counter, then host.
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_counter)}.{host}"


def _link_into(temporary: Path, folder: Path) -> Path:
    """Hard-link ``temporary`` into ``folder`` under a name that no file there has, and return the new path.

    The first name is the one ``temporary`` has.  When a file of that name
    exists, another name from ``_unique_name`` is tried, at most
    ``_LINK_ATTEMPTS`` names in all, and then FileExistsError is raised.
    On a file system without hard links (EPERM or EOPNOTSUPP), the file is
    renamed instead, as Postfix's local(8) does, and a rename replaces a
    file of the same name.
    """
    name = temporary.name
    for _ in range(_LINK_ATTEMPTS):
        final = folder / name
        try:
            os.link(temporary, final)
        except FileExistsError:
            name = _unique_name()
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            os.rename(temporary, final)
        return final
    raise FileExistsError(
        errno.EEXIST,
        f"failed to add the message to {folder}: {_LINK_ATTEMPTS} names in a row already exist there;"
        " check which other program writes files into it",
    )


def _make_durable_folders(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700, and fsync the folder holding each one."""
    missing: list[Path] = []
    while not path.is_dir() and path.parent != path:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        # Another delivery may create it at the same moment.  The fsync still runs,
        # because that delivery's fsync may not have happened yet.
        folder.mkdir(mode=0o700, exist_ok=True)
        _fsync_directory(folder.parent)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
