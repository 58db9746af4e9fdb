"""The ``[local] aliases`` file: parse it and reject what relay cannot deliver.

Each line is ``alias: target[, target]``; ``#`` starts a comment, and blank
lines are ignored.  A line that starts with a space or tab continues the
alias line above it.  Alias names match case-insensitively, and a name
defined twice is an error, because one definition would drop the other's
targets.  A target without
``@`` is a local user or another alias, and one with ``@`` is any address,
which is routed again.

relay delivers to Maildirs and to addresses only.  Targets that other MTAs
deliver themselves are rejected with the line number: a ``|command`` pipe,
a ``/file`` path and an ``:include:`` list, also in double quotes.  So is a
local target that cannot be a user name (``is_safe_user_name``).  Mail for
such an alias would be accepted at RCPT and then bounce, sending a DSN to a
sender who may be forged (backscatter).

For the same reason, the file is checked as a whole.  An alias must not
lead back to itself through other aliases (``a: b`` with ``b: a``).  An
alias that names itself (``carol: carol, copy@elsewhere``) means its own
mailbox, as in Postfix.  A chain of
aliases must be at most ``MAX_ALIAS_DEPTH`` levels deep, the depth to which
delivery expands them.  And one alias must expand to at most
``[local] alias_expansion_limit`` distinct users and addresses (default
``DEFAULT_EXPANSION_LIMIT``), counted as delivery expands it, with every
local user counted whether or not its Maildir exists yet.

``relay check-config``, the start of ``relay serve`` and every reload call
``parse_aliases``, so a file with any of these errors is reported before it
is used.
"""

from __future__ import annotations

import logging
import os
import threading

from relay.log import log_event
from relay.units import is_safe_user_name

# Levels of aliases that delivery expands: with a0: a1, ..., a9: user, the
# user is 10 levels below a0.  Deep enough for any hand-written alias file.
MAX_ALIAS_DEPTH = 10

# Users and addresses that one alias may expand to, as Postfix's
# virtual_alias_expansion_limit (1000 in Postfix 3.7's defaults).  It bounds
# the Maildir writes and the forwarded copy's recipients of one delivery.
DEFAULT_EXPANSION_LIMIT = 1000

_EXPECTED = 'relay supports only "alias: user[, user@domain]" targets'


class AliasError(ValueError):
    """An invalid aliases file, with one ``line N: ...`` message for each error in ``errors``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def parse_aliases(text: str, expansion_limit: int = DEFAULT_EXPANSION_LIMIT) -> dict[str, tuple[str, ...]]:
    """Parse an aliases file into ``alias -> targets``; raise AliasError listing every bad line and loop.

    An alias that expands to more than ``expansion_limit`` users and addresses is an error too.
    """
    aliases: dict[str, tuple[str, ...]] = {}
    lines: dict[str, int] = {}
    # The first line of every alias name, also of those rejected for their targets.
    defined: dict[str, int] = {}
    errors: list[tuple[int, str]] = []
    for number, raw_line, line in _logical_lines(text, errors):
        name, colon, rest = line.partition(":")
        targets = tuple(item.strip() for item in rest.split(",") if item.strip())
        if not colon or not name.strip() or not targets:
            errors.append((number, f"expected \"alias: user[, user@domain]\", got {raw_line!r}"))
            continue
        alias = name.strip().lower()
        if alias in defined:
            errors.append(
                (number, f"alias {alias} is defined again, first on line {defined[alias]};"
                 " merge the targets into one line")
            )
            continue
        defined[alias] = number
        problems = [problem for target in targets if (problem := _target_problem(target))]
        if problems:
            errors.extend((number, f"alias {alias}: {problem}; {_EXPECTED}") for problem in problems)
            continue
        aliases[alias] = targets
        lines[alias] = number

    # A local target may be an alias defined further down, so the graph is checked after the last line.
    errors.extend(_graph_errors(aliases, lines))
    bounds = _expansion_bounds(aliases)
    for alias, number in lines.items():
        if bounds[alias] <= expansion_limit:
            continue
        size = expansion_size(aliases, alias)
        if size > expansion_limit:
            errors.append(
                (number, f"alias {alias} expands to {size} users and addresses, more than the {expansion_limit}"
                 " that local.alias_expansion_limit allows; split the alias or raise the limit")
            )
    if errors:
        raise AliasError([f"line {number}: {message}" for number, message in sorted(errors)])
    return aliases


def _logical_lines(text: str, errors: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    """Join continuation lines, drop comments and return (first line number, first raw line, text) per alias line.

    A line that starts with a space or tab continues the line above it, as in
    sendmail's and Postfix's aliases(5), and blank and comment lines between
    them are skipped.  A continuation line with no alias line before it is
    added to ``errors``.
    """
    logical: list[tuple[int, str, str]] = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        if raw_line[0] not in " \t":
            logical.append((number, raw_line, line))
        elif logical:
            first_number, first_line, joined = logical[-1]
            logical[-1] = (first_number, first_line, f"{joined} {line}")
        else:
            errors.append(
                (number, f"continuation line {raw_line!r} has no alias line before it;"
                 " start the line with \"alias:\" or join it to the alias it belongs to")
            )
    return logical


def _target_problem(target: str) -> str | None:
    """Return why relay cannot deliver to ``target``, or None when it can."""
    unquoted = target[1:-1] if len(target) >= 2 and target[0] == target[-1] == '"' else target
    if unquoted.startswith("|"):
        return f"target {target!r} is a command, which relay does not run"
    if unquoted.startswith("/"):
        return f"target {target!r} is a file, which relay does not write"
    if unquoted.lower().startswith(":include:"):
        return f"target {target!r} is an include file, which relay does not read"
    if "@" not in target and not is_safe_user_name(target):
        return (
            f"target {target!r} is not a valid user name (letters, digits and . _ + = -,"
            " without a leading dot or .., at most 255 characters)"
        )
    return None


def _graph_errors(aliases: dict[str, tuple[str, ...]], lines: dict[str, int]) -> list[tuple[int, str]]:
    """Return (line, error) for each alias loop and each chain deeper than MAX_ALIAS_DEPTH."""

    def alias_targets(name: str) -> list[str]:
        # A target equal to the alias's own name means its mailbox, not a loop.
        return [
            target.lower()
            for target in aliases[name]
            if "@" not in target and target.lower() in aliases and target.lower() != name
        ]

    errors: list[tuple[int, str]] = []
    # Depth-first search without recursion, because a long chain would pass
    # Python's recursion limit.
    done: set[str] = set()
    # For each finished alias: the number of aliases on the longest chain that
    # starts with it (itself included), and the next alias on that chain.
    depth: dict[str, int] = {}
    next_alias: dict[str, str | None] = {}
    for start in aliases:
        if start in done:
            continue
        path = [start]
        on_path = {start}
        pending = [iter(alias_targets(start))]
        while pending:
            target = next(pending[-1], None)
            if target is None:
                name = path.pop()
                on_path.discard(name)
                pending.pop()
                done.add(name)
                below = [child for child in alias_targets(name) if child in depth]
                deepest = max(below, key=depth.__getitem__, default=None)
                depth[name] = 1 + (depth[deepest] if deepest is not None else 0)
                next_alias[name] = deepest
            elif target in on_path:
                loop = " -> ".join([*path[path.index(target) :], target])
                errors.append((lines[target], f"aliases form a loop, {loop}; an alias must not lead back to itself"))
            elif target not in done:
                path.append(target)
                on_path.add(target)
                pending.append(iter(alias_targets(target)))

    # Report a chain once, at the alias that starts it.
    named = {target for name in aliases for target in alias_targets(name)}
    for name, levels in depth.items():
        if levels <= MAX_ALIAS_DEPTH or name in named:
            continue
        chain: list[str] = []
        link: str | None = name
        while link is not None and len(chain) <= MAX_ALIAS_DEPTH:
            chain.append(link)
            link = next_alias[link]
        chain_text = " -> ".join(chain) + (" -> ..." if link is not None else "")
        errors.append(
            (lines[name], f"alias chain {chain_text} is {levels} aliases deep; relay follows at most {MAX_ALIAS_DEPTH},"
             " so shorten it")
        )
    return errors


def _expansion_bounds(aliases: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Return for each alias an upper bound of ``expansion_size``: its targets' bounds added up.

    Each alias is visited once, so a file where many aliases name one large
    alias is checked in linear time; only an alias whose bound passes the
    limit needs the exact walk.  A target that closes a loop adds nothing,
    which can make the bound too low, but a file with a loop is rejected anyway.
    """
    bounds: dict[str, int] = {}
    for start in aliases:
        if start in bounds:
            continue
        # Post-order without recursion: an alias is summed once all its alias targets are.
        stack = [(start, False)]
        on_path: set[str] = set()
        while stack:
            name, children_done = stack.pop()
            if name in bounds:
                continue
            alias_targets = [
                target.lower() for target in aliases[name]
                if "@" not in target and target.lower() != name and target.lower() in aliases
            ]
            if not children_done:
                on_path.add(name)
                stack.append((name, True))
                stack.extend((child, False) for child in alias_targets if child not in bounds and child not in on_path)
                continue
            on_path.discard(name)
            leaves = len(aliases[name]) - len(alias_targets)
            bounds[name] = leaves + sum(bounds.get(child, 0) for child in alias_targets)
    return bounds


def expansion_size(aliases: dict[str, tuple[str, ...]], alias: str) -> int:
    """Return how many distinct users and addresses delivery may expand ``alias`` to.

    The walk is delivery's (``LocalDelivery.expand``): each alias once, at most
    MAX_ALIAS_DEPTH levels down.  Every local user counts, because delivery
    forwards a user whose Maildir is missing as an address, which bounces.
    """
    users: set[str] = set()
    remote: set[str] = set()
    seen: set[str] = set()
    # Depth-first without recursion, as in _graph_errors.
    stack = [(alias, 0)]
    while stack:
        name, depth = stack.pop()
        if name in seen or depth > MAX_ALIAS_DEPTH:
            continue
        seen.add(name)
        targets = aliases.get(name)
        if targets is None:
            users.add(name)
            continue
        for target in targets:
            lowered = target.lower()
            if "@" in target:
                remote.add(target)
            elif lowered == name:
                users.add(name)
            else:
                stack.append((lowered, depth + 1))
    return len(users) + len(remote)


# The aliases of each file as the last check of the config read them (see
# ``remember_checked``).  relay serve's supervisor checks before it forks, so
# a worker or delivery process that starts later, after the file changed,
# still falls back to the version that was checked.
_checked_tables: dict[str, dict[str, tuple[str, ...]]] = {}


def remember_checked(path: str, table: dict[str, tuple[str, ...]]) -> None:
    """Record ``table`` as the checked version of the aliases file ``path``."""
    _checked_tables[path] = table


def checked_table(path: str) -> dict[str, tuple[str, ...]] | None:
    """Return the checked version of the aliases file ``path``, or None when no check read it."""
    return _checked_tables.get(path)


class AliasFile:
    """An aliases file, read again whenever it changes.

    A changed file that cannot be read or that ``parse_aliases`` rejects
    is logged as ``aliases_error`` once per change.  Until the file is
    valid again, the aliases read when the object was made are used: the
    file as checked at the start or the last reload.  Every process falls
    back to that same version, so RCPT never accepts an alias that delivery
    does not know, nor a ``|command`` alias or a loop that delivery would
    bounce.
    """

    def __init__(self, path: str, logger: logging.Logger, expansion_limit: int = DEFAULT_EXPANSION_LIMIT) -> None:
        self.path = path
        self._logger = logger
        self._expansion_limit = expansion_limit
        self._stamp: tuple[int, int] | None = None
        self._table: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self._checked: dict[str, tuple[str, ...]] = {}
        checked = checked_table(path)
        if checked is not None:
            self._checked = checked
            self.table()
        else:
            # No check read the file in this process: take it as it is now.
            self._checked = self.table()

    def names(self) -> set[str]:
        """Return the alias names."""
        return set(self.table())

    def table(self) -> dict[str, tuple[str, ...]]:
        """Return each alias with its targets, from the file as it is now when it is valid."""
        if not self.path:
            return {}
        with self._lock:
            try:
                stat = os.stat(self.path)
            except OSError as exc:
                # Gone for a moment while an editor replaces it, or removed: the
                # checked version stays in use, as for an unreadable file.
                if self._stamp is not None:
                    self._stamp = None
                    self._table = self._checked
                    log_event(self._logger, "aliases_error", logging.ERROR, file=self.path,
                              error=exc.strerror or str(exc))
                return self._table
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    with open(self.path, encoding="utf-8", errors="replace") as handle:
                        self._table = parse_aliases(handle.read(), self._expansion_limit)
                except OSError as exc:
                    self._table = self._checked
                    log_event(self._logger, "aliases_error", logging.ERROR, file=self.path,
                              error=exc.strerror or str(exc))
                except AliasError as exc:
                    self._table = self._checked
                    log_event(self._logger, "aliases_error", logging.ERROR, file=self.path,
                              error="; ".join(exc.errors))
            return self._table
