"""The ``[local] aliases`` file: parse it and reject what relay cannot deliver.

Each line is ``alias: target[, target]``; ``#`` starts a comment, and blank
lines are ignored.  Alias names match case-insensitively.  A target without
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
delivery expands them.

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

_EXPECTED = 'relay supports only "alias: user[, user@domain]" targets'


class AliasError(ValueError):
    """An invalid aliases file, with one ``line N: ...`` message for each error in ``errors``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def parse_aliases(text: str) -> dict[str, tuple[str, ...]]:
    """Parse an aliases file into ``alias -> targets``; raise AliasError listing every bad line and loop."""
    aliases: dict[str, tuple[str, ...]] = {}
    lines: dict[str, int] = {}
    errors: list[tuple[int, str]] = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        name, colon, rest = line.partition(":")
        targets = tuple(item.strip() for item in rest.split(",") if item.strip())
        if not colon or not name.strip() or not targets:
            errors.append((number, f"expected \"alias: user[, user@domain]\", got {raw_line!r}"))
            continue
        alias = name.strip().lower()
        problems = [problem for target in targets if (problem := _target_problem(target))]
        if problems:
            errors.extend((number, f"alias {alias}: {problem}; {_EXPECTED}") for problem in problems)
            continue
        aliases[alias] = targets
        lines[alias] = number

    # A local target may be an alias defined further down, so the graph is checked after the last line.
    errors.extend(_graph_errors(aliases, lines))
    if errors:
        raise AliasError([f"line {number}: {message}" for number, message in sorted(errors)])
    return aliases


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

    def __init__(self, path: str, logger: logging.Logger) -> None:
        self.path = path
        self._logger = logger
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
                        self._table = parse_aliases(handle.read())
                except OSError as exc:
                    self._table = self._checked
                    log_event(self._logger, "aliases_error", logging.ERROR, file=self.path,
                              error=exc.strerror or str(exc))
                except AliasError as exc:
                    self._table = self._checked
                    log_event(self._logger, "aliases_error", logging.ERROR, file=self.path,
                              error="; ".join(exc.errors))
            return self._table
