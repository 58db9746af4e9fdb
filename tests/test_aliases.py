"""The aliases file: what it accepts, and the targets, loops and chains that it rejects."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import relay.aliases
from relay.aliases import (
    DEFAULT_EXPANSION_LIMIT,
    MAX_ALIAS_DEPTH,
    AliasError,
    AliasFile,
    parse_aliases,
    remember_checked,
)
from relay.config import LocalConfig
from relay.delivery.maildir import LocalDelivery, UnknownUser

EXPECTED = 'relay supports only "alias: user[, user@domain]" targets'


def errors_of(text: str) -> list[str]:
    with pytest.raises(AliasError) as caught:
        parse_aliases(text)
    return caught.value.errors


def test_users_and_addresses_accepted() -> None:
    text = "# staff\nSales: alice, Bob\nteam: sales, carol@example.net  # nested\n\nbob.smith: b_s+x=y-z\n"

    aliases = parse_aliases(text)

    assert aliases == {
        "sales": ("alice", "Bob"),
        "team": ("sales", "carol@example.net"),
        "bob.smith": ("b_s+x=y-z",),
    }


def test_continuation_lines_join_alias() -> None:
    # A line that starts with a space or tab continues the alias above it,
    # across blank and comment lines, as in sendmail's and Postfix's aliases(5).
    text = "team: alice,\n  bob,\n\n# more\n\tcarol@example.net\nsales: dave\n"

    aliases = parse_aliases(text)

    assert aliases == {"team": ("alice", "bob", "carol@example.net"), "sales": ("dave",)}


def test_indented_alias_line_is_continuation() -> None:
    # An indented line belongs to the alias above it even when it looks like an
    # alias line, so "staff: bob" is an invalid target of team.
    errors = errors_of("team: alice,\n\tstaff: bob\n")

    assert errors == [
        "line 1: alias team: target 'staff: bob' is not a valid user name (letters, digits and . _ + = -,"
        f" without a leading dot or .., at most 255 characters); {EXPECTED}"
    ]


def test_continuation_without_alias_rejected() -> None:
    errors = errors_of("# staff\n  alice\nteam: bob\n")

    assert errors == ["line 2: continuation line '  alice' has no alias line before it;"
                      " start the line with \"alias:\" or join it to the alias it belongs to"]


def test_duplicate_alias_rejected() -> None:
    # Only one definition can be used, so a second one is an error instead of
    # silently dropping the targets of the other.
    errors = errors_of("team: alice\nsales: bob\nTeam: carol\n")

    assert errors == ["line 3: alias team is defined again, first on line 1; merge the targets into one line"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("pipe: |/usr/bin/procmail", "alias pipe: target '|/usr/bin/procmail' is a command, which relay does not run"),
        ('pipe: "|/usr/bin/vacation alice"', "alias pipe: target '\"|/usr/bin/vacation alice\"' is a command"),
        ("file: /var/log/mail.archive", "alias file: target '/var/log/mail.archive' is a file, which relay does not"),
        ('file: "/tmp/x"', "alias file: target '\"/tmp/x\"' is a file"),
        ("list: :include:/etc/mail/list", "alias list: target ':include:/etc/mail/list' is an include file"),
        ("list: :INCLUDE:/etc/mail/list", "alias list: target ':INCLUDE:/etc/mail/list' is an include file"),
        ("dots: ..", "alias dots: target '..' is not a valid user name"),
        ("mailbox: \\alice", "alias mailbox: target '\\\\alice' is not a valid user name"),
        # Longer than any file name: each delivery would fail with ENAMETOOLONG and defer.
        ("long: " + "a" * 256, f"alias long: target '{'a' * 256}' is not a valid user name"),
    ],
)
def test_undeliverable_target_rejected(line: str, error: str) -> None:
    errors = errors_of(f"ok: alice\n{line}\n")

    assert len(errors) == 1
    assert errors[0].startswith(f"line 2: {error}")
    assert errors[0].endswith(f"; {EXPECTED}")


def test_bad_target_among_good_ones_rejected() -> None:
    errors = errors_of("team: alice, |/bin/true, bob@example.net\n")

    assert errors == [f"line 1: alias team: target '|/bin/true' is a command, which relay does not run; {EXPECTED}"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a1: a2\na2: a1\n", "line 1: aliases form a loop, a1 -> a2 -> a1"),
        # Names match in any case, so this is a loop too.
        ("A1: A2\na2: a1\n", "line 1: aliases form a loop, a1 -> a2 -> a1"),
        # The loop is reported where it starts, not at the alias that leads into it.
        ("entry: a1\na1: a2, alice\na2: bob, a1\n", "line 2: aliases form a loop, a1 -> a2 -> a1"),
    ],
)
def test_alias_loop_rejected(text: str, error: str) -> None:
    errors = errors_of(text)

    assert errors == [f"{error}; an alias must not lead back to itself"]


def test_chain_depth_limit() -> None:
    def chain(aliases: int) -> str:
        lines = [f"c{level}: c{level + 1}" for level in range(aliases - 1)]
        return "\n".join([*lines, f"c{aliases - 1}: alice"]) + "\n"

    assert len(parse_aliases(chain(MAX_ALIAS_DEPTH))) == MAX_ALIAS_DEPTH

    errors = errors_of(chain(MAX_ALIAS_DEPTH + 1))

    assert errors == [
        "line 1: alias chain c0 -> c1 -> c2 -> c3 -> c4 -> c5 -> c6 -> c7 -> c8 -> c9 -> c10 is 11 aliases deep;"
        " relay follows at most 10, so shorten it"
    ]


def test_long_chain_checked_without_recursion() -> None:
    # Deeper than Python's default recursion limit of 1000.
    text = "\n".join(f"c{level}: c{level + 1}" for level in range(5000)) + "\n"

    errors = errors_of(text)

    assert len(errors) == 1
    assert errors[0].startswith("line 1: alias chain c0 -> c1 -> ")
    assert " -> ... is 5000 aliases deep;" in errors[0]


def test_every_error_reported_in_line_order() -> None:
    text = "a1: a2\npipe: |/bin/true\nsales alice\na2: a1\nfile: /tmp/x\n"

    errors = errors_of(text)

    assert [error.split(":", 1)[0] for error in errors] == ["line 1", "line 2", "line 3", "line 5"]
    assert errors[0].startswith("line 1: aliases form a loop, a1 -> a2 -> a1")
    assert errors[2] == "line 3: expected \"alias: user[, user@domain]\", got 'sales alice'"


@pytest.mark.parametrize("text", ["carol: carol, copy@backup.example.net\n", "carol: carol\n", "Carol: CAROL, bob\n"])
def test_alias_naming_itself_is_its_mailbox(text: str) -> None:
    # As in Postfix and sendmail, the alias's own name among its targets means its mailbox, not a loop.
    aliases = parse_aliases(text)

    assert "carol" in aliases


def test_invalid_change_falls_back_to_checked_aliases(tmp_path: Path) -> None:
    # Every process falls back to the version read at start or reload, never to
    # a later valid version that only some of them read.
    path = tmp_path / "aliases"
    path.write_text("team: alice\n")
    aliases = AliasFile(str(path), logging.getLogger("relay.test"))
    path.write_text("team: alice\nsupport: alice\n")
    assert aliases.names() == {"team", "support"}

    path.write_text("team: alice\nsupport: alice\npipe: |/bin/true\n")

    assert aliases.names() == {"team"}
    path.write_text("team: alice\nhelp: bob\n")
    assert aliases.names() == {"team", "help"}


def test_missing_file_falls_back_to_checked_aliases(tmp_path: Path) -> None:
    # An editor may remove the file for a moment while it replaces it.
    path = tmp_path / "aliases"
    path.write_text("team: alice\n")
    aliases = AliasFile(str(path), logging.getLogger("relay.test"))
    path.unlink()

    assert aliases.names() == {"team"}
    path.write_text("team: alice\nhelp: bob\n")
    assert aliases.names() == {"team", "help"}


def test_postmaster_alias_to_nobody_keeps_mailbox(tmp_path: Path) -> None:
    # RFC 5321 section 4.5.1: postmaster stays deliverable even when its alias leads nowhere.
    local = LocalDelivery(LocalConfig(maildir_root=str(tmp_path)), {"postmaster": ("root",)})

    expansion = local.expand("postmaster", "example.test")

    assert expansion.users == ("postmaster",)
    # root's copy still bounces, so that the missing mailbox shows.
    assert expansion.unknown == ("root@example.test",)


def test_unknown_member_becomes_address(tmp_path: Path) -> None:
    # ghost is listed directly and nobody through the alias helpers; neither
    # has a mailbox, so both become addresses in the recipient's domain.
    (tmp_path / "alice").mkdir()
    aliases = {"team": ("alice", "ghost", "helpers"), "helpers": ("nobody",)}
    local = LocalDelivery(LocalConfig(maildir_root=str(tmp_path)), aliases)

    expansion = local.expand("Team", "Example.test")

    assert expansion.users == ("alice",)
    assert expansion.remote == ("ghost@Example.test", "nobody@Example.test")
    assert expansion.unknown == ("ghost@Example.test", "nobody@Example.test")


def test_unknown_member_listed_as_address_once(tmp_path: Path) -> None:
    local = LocalDelivery(LocalConfig(maildir_root=str(tmp_path)), {"team": ("ghost", "ghost@example.test")})

    expansion = local.expand("team", "example.test")

    assert expansion.remote == ("ghost@example.test",)
    assert expansion.unknown == ()


def test_alias_of_unknown_members_only_unknown(tmp_path: Path) -> None:
    # No member leads anywhere, so the alias itself fails as an unknown user.
    local = LocalDelivery(LocalConfig(maildir_root=str(tmp_path)), {"team": ("ghost", "nobody")})

    with pytest.raises(UnknownUser):
        local.expand("team", "example.test")


def test_unknown_address_is_not_a_member(tmp_path: Path) -> None:
    local = LocalDelivery(LocalConfig(maildir_root=str(tmp_path)), {})

    with pytest.raises(UnknownUser):
        local.expand("ghost", "example.test")


def test_later_process_falls_back_to_checked_aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # relay serve checks the file before it forks.  A worker that builds its
    # AliasFile after the file became invalid falls back to that checked version,
    # like the processes that started earlier, and not to no aliases at all.
    monkeypatch.setattr(relay.aliases, "_checked_tables", {})
    path = tmp_path / "aliases"
    path.write_text("sales: alice\n")
    remember_checked(str(path), parse_aliases(path.read_text()))
    path.write_text("sales: alice\nloop: pool\npool: loop\n")

    aliases = AliasFile(str(path), logging.getLogger("relay.test"))

    assert aliases.names() == {"sales"}


def test_expansion_limit_default_is_postfix() -> None:
    # Postfix 3.7: virtual_alias_expansion_limit = 1000.
    assert DEFAULT_EXPANSION_LIMIT == 1000
    users = ", ".join(f"user{number}" for number in range(DEFAULT_EXPANSION_LIMIT))
    assert len(parse_aliases(f"staff: {users}\n")) == 1

    errors = errors_of(f"staff: {users}, extra@example.test\nall: staff\n")

    assert errors == [
        "line 1: alias staff expands to 1001 users and addresses, more than the 1000 that"
        " local.alias_expansion_limit allows; split the alias or raise the limit",
        "line 2: alias all expands to 1001 users and addresses, more than the 1000 that"
        " local.alias_expansion_limit allows; split the alias or raise the limit",
    ]


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        # A user reached through two aliases counts once, as delivery writes one copy.
        ("all: a, b\na: u1, u2\nb: u2, U1\n", {"all": 2, "a": 2, "b": 2}),
        # An address counts as written, and the alias's own mailbox counts.
        ("carol: carol, copy@elsewhere.test, Copy@elsewhere.test\n", {"carol": 3}),
        ("top: mid, x@example.test\nmid: u1, u2, u3\n", {"top": 4, "mid": 3}),
    ],
)
def test_expansion_limit_counts_distinct_targets(text: str, sizes: dict[str, int]) -> None:
    assert parse_aliases(text, expansion_limit=max(sizes.values())).keys() == sizes.keys()
    for alias, size in sizes.items():
        with pytest.raises(AliasError) as caught:
            parse_aliases(text, expansion_limit=size - 1)
        assert any(f"alias {alias} expands to {size} users and addresses" in error for error in caught.value.errors)


def test_expansion_over_limit_falls_back_to_checked_aliases(tmp_path: Path) -> None:
    # RCPT and delivery re-read a changed file with the configured limit.
    path = tmp_path / "aliases"
    path.write_text("team: alice, bob\n")
    aliases = AliasFile(str(path), logging.getLogger("relay.test"), expansion_limit=2)

    path.write_text("team: alice, bob\nbig: alice, bob, carol\n")

    assert aliases.names() == {"team"}
