"""Sans-IO transcript tests of the SMTP session: every command and reply.

Each transcript runs whole, byte by byte and with trailing bytes (see
``tests/smtp_transcript.py``).  Hostile-input cases that concern the
receiving side are here too, named after the kind of fault they stand for;
``tests/test_serve_hostile.py`` replays them over sockets against
``relay serve``.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import tracemalloc
from pathlib import Path

import pytest

from relay.delivery.maildir import LocalDelivery, UnknownUser
from relay.smtp import replies
from relay.smtp.policy import RelayPolicy, _AliasFile
from relay.smtp.received import received_header
from relay.smtp.session import MAX_DISCARDED_CHUNK
from relay.smtp.transaction import MessageReady, Rejected
from tests.smtp_transcript import (
    TRUSTED,
    UNTRUSTED,
    feed,
    hostile_config,
    make_session,
    run_transcript,
    split_replies,
)

EHLO = b"EHLO client.example.com\r\n"
T = b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.net>\r\n"
PLAIN_OK = base64.b64encode(b"\0user\0pass")
PLAIN_BAD = base64.b64encode(b"\0user\0wrong")


def test_reply_catalog_has_enhanced_codes() -> None:
    for name, reply in replies.CATALOG.items():
        if reply.code >= 400:
            assert reply.status, name
            assert reply.status[0] == str(reply.code)[0], name
            assert reply.encode().startswith(f"{reply.code} {reply.status} ".encode()), name


def test_ehlo_advertises_extensions() -> None:
    outcome = run_transcript(make_session, [(EHLO, ["250-"])])
    ehlo = outcome.replies[1].split("|")
    keywords = [line[4:] for line in ehlo[1:]]
    assert keywords == [
        "PIPELINING",
        f"SIZE {10 * 1024 * 1024}",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
        "STARTTLS",
    ]


def test_ehlo_offers_auth_after_tls_only() -> None:
    outcome = run_transcript(make_session, [(EHLO, ["250"]), (b"STARTTLS\r\n", ["220 2.0.0"]), (EHLO, ["250"])])
    assert "AUTH PLAIN LOGIN" not in outcome.replies[1]
    assert "STARTTLS" not in outcome.replies[3]
    assert "250 AUTH PLAIN LOGIN" in outcome.replies[3]


def test_auth_offered_in_plaintext_when_allowed() -> None:
    outcome = run_transcript(lambda: make_session(auth_plaintext=True), [(EHLO, ["250"])])
    assert "AUTH PLAIN LOGIN" in outcome.replies[1]


def test_greeting_names_host() -> None:
    outcome = feed(make_session(), [])
    assert outcome.replies == ["220 mx.example.test ESMTP relay"]


def test_full_transaction_with_data() -> None:
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250 2.1.0"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["250 2.1.5"]),
            (b"DATA\r\n", ["354"]),
            (b"Subject: s\r\n\r\nbody\r\n..dot\r\n.\r\n", ["250 2.0.0 Ok: queued as Q1"]),
            (b"QUIT\r\n", ["221 2.0.0"]),
        ],
    )
    assert outcome.closed
    message = outcome.messages[0]
    assert message.body == b"Subject: s\r\n\r\nbody\r\n.dot\r\n"
    assert message.transaction.sender == "sender@example.com"
    assert [r.address for r in message.transaction.recipients] == ["rcpt@example.net"]
    assert message.protocol == "ESMTP"


def test_helo_gives_plain_smtp() -> None:
    outcome = run_transcript(
        make_session,
        [(b"HELO client.example.com\r\n", ["250 mx.example.test"]), (T + b"DATA\r\n", ["250", "250", "354"]),
         (b"x\r\n.\r\n", ["250"])],
    )
    assert outcome.messages[0].protocol == "SMTP"


def test_session_commands() -> None:
    run_transcript(
        make_session,
        [
            (b"NOOP\r\n", ["250 2.0.0"]),
            (b"NOOP anything\r\n", ["250 2.0.0"]),
            (b"HELP\r\n", ["214-2.0.0", ]),
            (b"VRFY rcpt\r\n", ["252 2.0.0"]),
            (b"VRFY\r\n", ["501 5.5.4"]),
            (b"EXPN list\r\n", ["502 5.5.1"]),
            (b"RSET\r\n", ["250 2.0.0"]),
            (b"RSET x\r\n", ["501 5.5.4"]),
            (b"QUIT x\r\n", ["501 5.5.4"]),
            (b"QUIT\r\n", ["221 2.0.0"]),
        ],
    )


@pytest.mark.parametrize(
    ("starttls", "auth_plaintext", "offered"),
    [(False, False, []), (True, False, ["STARTTLS"]), (True, True, ["STARTTLS", "AUTH"])],
)
def test_help_lists_what_the_session_offers(starttls: bool, auth_plaintext: bool, offered: list[str]) -> None:
    # HELP names STARTTLS and AUTH only where EHLO advertises them too.
    outcome = run_transcript(
        lambda: make_session(starttls=starttls, auth_plaintext=auth_plaintext),
        [(b"EHLO client.example.com\r\n", ["250"]), (b"HELP\r\n", ["214-2.0.0 Commands: EHLO HELO MAIL"])],
    )
    ehlo, help_reply = outcome.replies[1], outcome.replies[2]
    commands = help_reply.split("|")[0].split("Commands: ")[1].split()
    assert [name for name in ("STARTTLS", "AUTH") if name in commands] == offered
    assert [name for name in ("STARTTLS", "AUTH") if f"250-{name}" in ehlo or f"250 {name}" in ehlo] == offered


def test_sequence_errors() -> None:
    run_transcript(
        make_session,
        [
            (b"MAIL FROM:<sender@example.com>\r\n", ["503 5.5.1"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["503 5.5.1"]),
            (b"DATA\r\n", ["503 5.5.1"]),
            (EHLO, ["250"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["503 5.5.1"]),
            (b"DATA\r\n", ["503 5.5.1"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["503 5.5.1"]),
            (b"DATA\r\n", ["503 5.5.1"]),
            (b"DATA x\r\n", ["501 5.5.4"]),
        ],
    )


def test_unknown_command_and_line_too_long() -> None:
    run_transcript(
        make_session,
        [
            (b"FOO\r\n", ["500 5.5.1"]),
            (b"NOOP " + b"a" * 600 + b"\r\n", ["500 5.5.2"]),
            (b"NOOP\r\n", ["250"]),
        ],
    )


def padded(head: bytes, total: int, end: bytes = b"\r\n") -> bytes:
    """Return ``head`` padded with "x" to ``total`` octets, counting the line end as CRLF."""
    return head + b"x" * (total - 2 - len(head)) + end


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        # RFC 5321 section 4.5.3.1.4: 512 octets with CRLF; a bare LF counts as CRLF would.
        (padded(b"NOOP ", 512), "250 2.0.0"),
        (padded(b"NOOP ", 513), "500 5.5.2"),
        (padded(b"NOOP ", 512, b"\n"), "250 2.0.0"),
        (padded(b"NOOP ", 513, b"\n"), "500 5.5.2"),
        # MAIL and RCPT get 1024 more octets for their parameters, so this
        # line is parsed, and its unknown parameter gets the reply.
        (padded(b"MAIL FROM:<s@example.com> X-PAD=", 1536), "555 5.5.4"),
        (padded(b"MAIL FROM:<s@example.com> X-PAD=", 1537), "500 5.5.2"),
    ],
)
def test_line_limit_exact_and_one_over(line: bytes, reply: str) -> None:
    outcome = run_transcript(make_session, [(EHLO, ["250"]), (line, [reply]), (b"NOOP\r\n", ["250"])])
    assert len(outcome.replies) == 4


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        # Each line also has a syntax error.  Over the limit, the reply
        # reports the length and not the syntax error.
        pytest.param(padded(b"RSET ", 512), "501 5.5.4", id="rset-at-limit"),
        pytest.param(padded(b"RSET ", 513), "500 5.5.2", id="rset"),
        pytest.param(padded(b"QUIT ", 513), "500 5.5.2", id="quit"),
        pytest.param(padded(b"STARTTLS ", 513), "500 5.5.2", id="starttls"),
        pytest.param(padded(b"XYZZY ", 513), "500 5.5.2", id="unknown-verb"),
        pytest.param(padded(b"VRFY \x01", 513), "500 5.5.2", id="control-character"),
        pytest.param(padded(b"MAIL FROM:<s@example.com> SIZE=x", 1536), "501 5.5.4", id="mail-at-limit"),
        pytest.param(padded(b"MAIL FROM:<s@example.com> SIZE=x", 1537), "500 5.5.2", id="mail"),
    ],
)
def test_line_limit_before_syntax_errors(line: bytes, reply: str) -> None:
    outcome = run_transcript(make_session, [(EHLO, ["250"]), (line, [reply]), (b"NOOP\r\n", ["250"])])
    assert len(outcome.replies) == 4


def test_overlong_refused_data_drops_text() -> None:
    # A DATA line over the limit that the parser also rejects still drops the text behind it.
    text = b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\nforged\r\n.\r\n"
    outcome = feed(make_session(client=TRUSTED), [EHLO + T + padded(b"DATA now ", 600) + text])

    assert outcome.replies[-2] == "500 5.5.2 Line too long"
    assert outcome.replies[-1] == "554 5.5.0 Protocol synchronization error, closing connection"
    assert outcome.closed
    assert outcome.messages == []


@pytest.mark.parametrize(("total", "reply"), [(12288, "235 2.7.0"), (12289, "500 5.5.6")])
def test_auth_response_limit_exact_and_one_over(total: int, reply: str) -> None:
    # A SASL response line may reach policy.max_auth_line_length, 12288 octets
    # with CRLF by default.  Spaces at its end are stripped before base64
    # decoding, so the padding does not change the credentials.
    response = PLAIN_OK + b" " * (total - 2 - len(PLAIN_OK)) + b"\r\n"
    run_transcript(
        lambda: make_session(auth_plaintext=True),
        [(EHLO, ["250"]), (b"AUTH PLAIN\r\n", ["334"]), (response, [reply]), (b"NOOP\r\n", ["250"])],
    )


def test_long_ehlo_survives() -> None:
    # Hostile input: a 10000-octet EHLO once overflowed a heap buffer in Exim.
    run_transcript(
        make_session,
        [
            (b"EHLO " + b"a" * 10000 + b"\r\n", ["500 5.5.2"]),
            (b"EHLO " + b"a" * 490 + b"\r\n", ["250"]),
            (EHLO, ["250"]),
        ],
    )


def test_greeting_lines_fit_512_octets() -> None:
    # A 253-octet server name and a 255-octet client name would make a
    # 522-octet line; RFC 5321 section 4.5.3.1.5 allows 512 with the CRLF.
    hostname = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 56, "test"])
    config = hostile_config()
    config = config.replace(server=dataclasses.replace(config.server, hostname=hostname))
    client_name = "e" * 63 + "." + "f" * 63 + "." + "g" * 63 + "." + "h" * 63
    for verb in (b"EHLO", b"HELO"):
        outcome = feed(make_session(config), [verb + b" " + client_name.encode() + b"\r\n"])
        line = outcome.raw.split(b"\r\n")[1] + b"\r\n"

        assert len(line) == 512, verb
        assert line.startswith(b"250" + (b"-" if verb == b"EHLO" else b" ") + hostname.encode() + b" greets eee")


def test_ehlo_requires_domain() -> None:
    run_transcript(
        make_session,
        [
            (b"EHLO\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["503 5.5.1"]),
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
        ],
    )


def test_second_ehlo_resets_transaction() -> None:
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (T, ["250", "250"]),
            (b"EHLO client2.example.com\r\n", ["250"]),
            (b"DATA\r\n", ["503 5.5.1"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["503 5.5.1"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
        ],
    )


def test_second_ehlo_keeps_auth_and_names_new_helo() -> None:
    outcome = run_transcript(
        lambda: make_session(auth_plaintext=True),
        [
            (EHLO, ["250"]),
            (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["235 2.7.0"]),
            (T, ["250", "250"]),
            (b"EHLO client2.example.com\r\n", ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n", ["250", "250", "354"]),
            (b"x\r\n.\r\n", ["250"]),
        ],
    )
    assert outcome.messages[0].helo_name == "client2.example.com"
    assert outcome.messages[0].auth_user == "user"
    assert outcome.messages[0].protocol == "ESMTPA"


def test_rset_before_ehlo() -> None:
    run_transcript(
        make_session,
        [
            (b"RSET\r\n", ["250"]),
            (b"NOOP\r\n", ["250"]),
            (b"rset\r\n", ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["503 5.5.1"]),
            (EHLO, ["250"]),
        ],
    )


def test_rset_drops_transaction_only() -> None:
    run_transcript(
        make_session,
        [(EHLO, ["250"]), (T, ["250", "250"]), (b"RSET\r\n", ["250"]), (b"DATA\r\n", ["503"]),
         (b"MAIL FROM:<a@example.com>\r\n", ["250"])],
    )


def test_null_sender_accepted() -> None:
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<>\r\n", ["250"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["250"]),
            (b"DATA\r\n", ["354"]),
            (b"Subject: bounce\r\n\r\nx\r\n.\r\n", ["250"]),
            (b"MAIL FROM:<> SIZE=100\r\n", ["250"]),
        ],
    )
    assert outcome.messages[0].transaction.sender == ""


def test_mail_syntax() -> None:
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<\">\r\n", ["501"]),
            (b"MAIL FROM:<;sleep 66;>\r\n", ["501"]),
            (b"mail from:<sender@example.com>\r\n", ["250"]),
            (b"RCPT TO:<;id;@example.net>\r\n", ["501"]),
            (b"RCPT TO:<rcpt>\r\n", ["501"]),
            (b"RCPT TO:<postmaster>\r\n", ["250"]),
        ],
    )


def test_missing_angle_brackets_accepted() -> None:
    # Policy: lenient like most MTAs, but the envelope holds exactly the address.
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:sender@example.com\r\n", ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["503 5.5.1"]),
            (b"RCPT TO:rcpt@example.net\r\nDATA\r\n", ["250", "354"]),
            (b"x\r\n.\r\n", ["250"]),
        ],
    )
    transaction = outcome.messages[0].transaction
    assert transaction.sender == "sender@example.com"
    assert transaction.recipients[0].address == "rcpt@example.net"


def test_space_after_colon() -> None:
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM: <sender@example.com>\r\n", ["250"]),
            (b"RCPT TO: <rcpt@example.net> NOTIFY=SUCCESS,FAILURE\r\n", ["250"]),
            (b"DATA\r\n", ["354"]),
            (b"x\r\n.\r\n", ["250"]),
        ],
    )
    transaction = outcome.messages[0].transaction
    assert transaction.sender == "sender@example.com"
    assert transaction.recipients[0].address == "rcpt@example.net"
    assert transaction.recipients[0].notify == ("SUCCESS", "FAILURE")


def test_quoted_local_parts() -> None:
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b'MAIL FROM:<""@example.com>\r\n', ["250"]),
            (b'RCPT TO:<"info@"@example.org>\r\n', ["250"]),
            (b'RCPT TO:<"a b"@example.org>\r\n', ["250"]),
            (b"DATA\r\n", ["354"]),
            (b"x\r\n.\r\n", ["250"]),
        ],
    )
    transaction = outcome.messages[0].transaction
    assert transaction.sender == '""@example.com'
    assert [r.address for r in transaction.recipients] == ['"info@"@example.org', '"a b"@example.org']


def test_quoted_local_part_of_local_domain_is_permanent() -> None:
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b'RCPT TO:<"info@"@example.net>\r\n', ["550 5.1.1"]),
            (b'RCPT TO:<""@example.net>\r\n', ["550 5.1.1"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["250"]),
        ],
    )


def test_quoted_local_part_names_unquoted_mailbox(tmp_path: Path) -> None:
    # RFC 5321 section 4.1.2: "rcpt" could be a Dot-string, so it is the
    # mailbox rcpt, whether that is a configured user, a Maildir or an alias.
    (tmp_path / "mail" / "dora").mkdir(parents=True)
    aliases = tmp_path / "aliases"
    aliases.write_text("sales: dora\n")
    config = hostile_config()
    config = config.replace(
        local=dataclasses.replace(config.local, maildir_root=str(tmp_path / "mail"), aliases=str(aliases))
    )
    outcome = run_transcript(
        lambda: make_session(config, client=UNTRUSTED),
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b'RCPT TO:<"rcpt"@example.net>\r\n', ["250 2.1.5"]),
            (b'RCPT TO:<"d\\ora"@example.net>\r\n', ["250 2.1.5"]),
            (b'RCPT TO:<"sales"@example.net>\r\n', ["250 2.1.5"]),
            (b'RCPT TO:<"first.last"@example.net>\r\n', ["550 5.1.1"]),
            (b'RCPT TO:<"rcpt "@example.net>\r\n', ["550 5.1.1"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["250 2.1.5"]),
            (b"DATA\r\n", ["354"]),
            (b"x\r\n.\r\n", ["250"]),
        ],
    )

    recipients = [r.address for r in outcome.messages[0].transaction.recipients]
    # Stored in the unquoted form, and the later unquoted RCPT is a repeat.
    assert recipients == ["rcpt@example.net", "dora@example.net", "sales@example.net"]


def test_quoted_local_part_relay_checks_use_unquoted_form() -> None:
    # The unquoted form decides relaying too: "a%b" is the routing form a%b.
    config = hostile_config(relay_domains=("relay.example",))
    outcome = run_transcript(
        lambda: make_session(config, client=UNTRUSTED),
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b'RCPT TO:<"a%b"@relay.example>\r\n', ["554 5.7.1"]),
            (b'RCPT TO:<"ann"@relay.example>\r\n', ["250"]),
            (b'RCPT TO:<"ann"@elsewhere.example>\r\n', ["554 5.7.1"]),
            (b"DATA\r\n", ["354"]),
            (b"x\r\n.\r\n", ["250"]),
        ],
    )

    assert [r.address for r in outcome.messages[0].transaction.recipients] == ["ann@relay.example"]


def test_non_ascii_addresses() -> None:
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<s\xc3\xa9nder@example.com>\r\n", ["553 5.6.7"]),
            (b"MAIL FROM:<s\xe9nder@example.com> SMTPUTF8\r\n", ["5"]),
            (b"\xc0MAIL FROM:<sender@example.com>\r\n", ["5"]),
            (b"MAIL FROM:<s\xc3\xa9nder@example.com> SMTPUTF8\r\n", ["250"]),
        ],
    )


def test_non_ascii_recipient_needs_smtputf8_mail() -> None:
    # RFC 6531 puts SMTPUTF8 on MAIL only; it covers every RCPT of the transaction.
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"RCPT TO:<r\xc3\xa9@b\xc3\xbccher.example>\r\n", ["553 5.6.7"]),
            (b"RSET\r\n", ["250"]),
            (b"MAIL FROM:<sender@example.com> SMTPUTF8\r\n", ["250"]),
            (b"RCPT TO:<r\xc3\xa9@b\xc3\xbccher.example>\r\n", ["250"]),
            (b"RCPT TO:<r\xe9@example.net>\r\n", ["501 5.1.3"]),
        ],
    )


def test_smtputf8_protocol_name() -> None:
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            ("MAIL FROM:<sénder@example.com> SMTPUTF8\r\n".encode(), ["250"]),
            (b"RCPT TO:<rcpt@example.net>\r\nDATA\r\n", ["250", "354"]),
            ("Subject: é\r\n\r\nx\r\n.\r\n".encode(), ["250"]),
        ],
    )
    assert outcome.messages[0].protocol == "UTF8SMTP"


def test_body_and_size_parameters() -> None:
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com> BODY=8BITMIME\r\nRSET\r\n", ["250", "250"]),
            (b"MAIL FROM:<sender@example.com> body=8bitmime\r\nRSET\r\n", ["250", "250"]),
            (b"MAIL FROM:<sender@example.com> BODY=7bit\r\nRSET\r\n", ["250", "250"]),
            (b"MAIL FROM:<sender@example.com> BODY=BINARYMIME\r\nRSET\r\n", ["555", "250"]),
            (b"MAIL FROM:<sender@example.com> SIZE=abc\r\nRSET\r\n", ["501 5.5.4", "250"]),
            (b"MAIL FROM:<sender@example.com> SIZE=99999999999999999999\r\nRSET\r\n", ["552 5.3.4", "250"]),
            (b"MAIL FROM:<sender@example.com> BODY=8BITMIME BODY=7BIT\r\nRSET\r\n", ["501", "250"]),
            (b"MAIL FROM:<sender@example.com> FOO=1\r\n", ["555 5.5.4"]),
        ],
    )


def test_xtext_with_control_characters_rejected() -> None:
    run_transcript(
        lambda: make_session(auth_plaintext=True),
        [
            (EHLO, ["250"]),
            (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["235"]),
            (b"MAIL FROM:<sender@example.com> AUTH=sender+40example.com+0Ainjected\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<sender@example.com> AUTH=<>\r\n", ["250"]),
            (
                b"RCPT TO:<rcpt@example.net> NOTIFY=FAILURE ORCPT=rfc822;rcpt+40example.net+0D+0AX-Evil:+201\r\n",
                ["501 5.5.4"],
            ),
            (b"RCPT TO:<rcpt@example.net> ORCPT=rfc822;rcpt+40example.net\r\n", ["250"]),
            (b"DATA\r\n", ["354"]),
            (b"x\r\n.\r\n", ["250"]),
        ],
    )


def test_cr_in_arguments_rejected() -> None:
    outcome = run_transcript(
        make_session,
        [
            (b"EHLO client.example.com\rX-Evil: 1\r\n", ["501"]),
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com\rX-Injected: yes>\r\n", ["501"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"RCPT TO:<rcpt@example.net\rBcc: x@example.org>\r\n", ["501"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["250"]),
            (b"DATA\r\n", ["354"]),
            (b"Subject: s\r\n\r\nx\r\n.\r\n", ["250"]),
        ],
    )
    assert outcome.messages[0].helo_name == "client.example.com"


def test_bare_lf_ends_command_line() -> None:
    # Policy: a bare LF ends a command line when the client waits for the
    # reply, so LF-only clients work; inside DATA it never ends anything.
    run_transcript(
        lambda: make_session(client=UNTRUSTED),
        [(b"EHLO client.example.com\n", ["250"]), (b"NOOP\n", ["250"])],
    )


def test_bare_lf_lines_each_run_as_a_command() -> None:
    # As in Postfix, a bare LF ends a command line even with input behind it,
    # so LF-ended pipelined commands get one reply each.
    for client in (TRUSTED, UNTRUSTED):
        session = make_session(client=client)

        pipelined = b"EHLO client.example.com\nMAIL FROM:<sender@example.org>\r\n"
        outcome = feed(session, [pipelined, b"RSET\r\n", b"NOOP\nNOOP\nQUIT\r\n"])

        assert outcome.replies[1].startswith("250-")
        assert outcome.replies[2].startswith("250 2.1.0")
        assert outcome.replies[3].startswith("250 2.0.0")
        assert outcome.replies[4:] == ["250 2.0.0 OK", "250 2.0.0 OK", "221 2.0.0 Bye"]
        assert outcome.closed


def test_lf_ended_data_reads_message_text() -> None:
    # With LF-ended commands before it, DATA still starts the message: the
    # command-like lines after it are message text, not a second envelope.
    text = b"Subject: x\r\n\r\nMAIL FROM:<spoof@example.org>\r\nRCPT TO:<victim@example.test>\r\n.\r\n"
    outcome = feed(
        make_session(client=TRUSTED),
        [b"EHLO client.example.com\r\n", b"MAIL FROM:<a@example.org>\nRCPT TO:<b@example.test>\nDATA\n" + text],
    )

    assert [reply[:3] for reply in outcome.replies] == ["220", "250", "250", "250", "354", "250"]
    [message] = outcome.messages
    assert message.transaction.sender == "a@example.org"
    assert message.body == text[:-3]


@pytest.mark.parametrize("client", [TRUSTED, UNTRUSTED])
def test_refused_data_never_runs_text_as_commands(client: str) -> None:
    # Every RCPT failed, so DATA is refused: the pipelined text behind it must
    # not run as commands, or its MAIL, RCPT and DATA lines would queue a message.
    text = b"Subject: form\r\n\r\nRSET\r\nMAIL FROM:<ceo@example.org>\r\nRCPT TO:<a@example.test>\r\nDATA\r\nx\r\n.\r\n"
    outcome = feed(
        make_session(client=client),
        [b"EHLO client.example.com\r\n", b"MAIL FROM:<a@example.org>\r\nDATA\r\n" + text],
    )

    assert outcome.replies[2].startswith("250 2.1.0")
    assert outcome.replies[3].startswith("503 5.5.1")
    assert outcome.replies[4] == "554 5.5.0 Protocol synchronization error, closing connection"
    assert len(outcome.replies) == 5
    assert outcome.closed
    assert outcome.messages == []


# -- relay policy -------------------------------------------------------------


def test_relay_denied_for_untrusted() -> None:
    run_transcript(
        lambda: make_session(client=UNTRUSTED),
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"RCPT TO:<x@example.org>\r\n", ["554 5.7.1"]),
            (b"RCPT TO:<nosuchuser@example.net>\r\n", ["550 5.1.1"]),
            (b"RCPT TO:<postmaster@example.net>\r\n", ["250"]),
            (b"RCPT TO:<Postmaster>\r\n", ["250"]),
            (b"RCPT TO:<rcpt@EXAMPLE.NET>\r\n", ["250"]),
        ],
    )


def test_relay_domain_accepted_from_anyone() -> None:
    config = hostile_config(relay_domains=("example.org",))
    run_transcript(
        lambda: make_session(config, client=UNTRUSTED),
        [(EHLO, ["250"]), (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@example.org>\r\n", ["250", "250"])],
    )


def test_relay_allowed_after_auth() -> None:
    run_transcript(
        lambda: make_session(client=UNTRUSTED, auth_plaintext=True),
        [
            (EHLO, ["250"]),
            (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["235"]),
            (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@example.org>\r\n", ["250", "250"]),
        ],
    )


def test_address_literals() -> None:
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"RCPT TO:<rcpt@[192.0.2.30]>\r\n", ["550 5.7.1"]),
            (b"RCPT TO:<rcpt@[IPv6:2001:db8::30]>\r\n", ["550 5.7.1"]),
            (b"RCPT TO:<rcpt@[192.0.2.300]>\r\n", ["501"]),
            (b"RCPT TO:<rcpt@[127.0.0.1]>\r\n", ["550 5.7.1"]),
            (b"RCPT TO:<rcpt@[192.0.2.30].example.com>\r\n", ["501"]),
        ],
    )
    config = hostile_config(allow_address_literals=True)
    run_transcript(
        lambda: make_session(config),
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"RCPT TO:<rcpt@[192.0.2.30]>\r\n", ["250"]),
            (b"RCPT TO:<rcpt@[IPv6:2001:db8::30]>\r\n", ["250"]),
            (b"RCPT TO:<rcpt@[127.0.0.1]>\r\n", ["550 5.7.1"]),
            (b"RCPT TO:<rcpt@[IPv6:::1]>\r\n", ["550 5.7.1"]),
            (b"RCPT TO:<rcpt@[169.254.1.1]>\r\n", ["550 5.7.1"]),
            (b"RCPT TO:<rcpt@[0.0.0.0]>\r\n", ["550 5.7.1"]),
        ],
    )


def test_too_many_recipients() -> None:
    config = hostile_config(max_recipients=2)
    run_transcript(
        lambda: make_session(config),
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<a@example.com>\r\n", ["250"]),
            (b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n",
             ["250", "250", "452 4.5.3"]),
            # A repeat adds no recipient, so it gets 250 at the limit as below it.
            (b"RCPT TO:<B@example.org>\r\n", ["250"]),
        ],
    )


def test_submission_requires_auth() -> None:
    run_transcript(
        lambda: make_session(role="submission", auth_plaintext=True),
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<a@example.com>\r\n", ["530 5.7.0"]),
            (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["235"]),
            (b"MAIL FROM:<a@example.com>\r\n", ["250"]),
        ],
    )


def test_submission_adds_date_and_message_id() -> None:
    # Fed once: the added Message-ID is random, so runs cannot be compared.
    outcome = feed(
        make_session(role="submission", auth_plaintext=True),
        [
            EHLO,
            b"AUTH PLAIN " + PLAIN_OK + b"\r\n",
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
            b"Subject: s\r\n\r\nx\r\n.\r\n",
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
            b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <a@b>\r\n\r\nx\r\n.\r\n",
        ],
    )
    assert [r[:3] for r in outcome.replies] == ["220", "250", "235"] + ["250", "250", "354", "250"] * 2
    first = outcome.messages[0].body
    assert first.startswith(b"Date: ")
    assert b"\r\nMessage-ID: <" in first
    assert first.endswith(b"Subject: s\r\n\r\nx\r\n")
    assert outcome.messages[1].body == b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <a@b>\r\n\r\nx\r\n"


@pytest.mark.parametrize(
    "header",
    [
        b"Date : Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID : <a@b>\r\n",
        b"DATE\t: Thu, 1 Jan 2026 00:00:00 +0000\r\nmessage-id  :<a@b>\r\n",
    ],
)
def test_submission_sees_fields_with_space_before_colon(header: bytes) -> None:
    outcome = feed(
        make_session(role="submission", auth_plaintext=True),
        [
            EHLO,
            b"AUTH PLAIN " + PLAIN_OK + b"\r\n",
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
            header + b"\r\nx\r\n.\r\n",
        ],
    )
    assert [r[:3] for r in outcome.replies] == ["220", "250", "235", "250", "250", "354", "250"]
    assert outcome.messages[0].body == header + b"\r\nx\r\n"


def test_mail_loop_counts_received_with_space_before_colon() -> None:
    received = b"Received : from a.example by b.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    config = hostile_config(max_received_headers=5)
    outcome = run_transcript(
        lambda: make_session(config),
        [
            (EHLO, ["250"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (received * 6 + b"Subject: loop\r\n\r\nx\r\n.\r\n", ["554 5.4.6"]),
        ],
    )
    assert outcome.messages == []


def test_sink_accepts_any_recipient() -> None:
    run_transcript(
        lambda: make_session(role="sink", client=UNTRUSTED),
        [(EHLO, ["250"]), (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@example.org>\r\n", ["250", "250"])],
    )


def test_too_many_errors_closes() -> None:
    outcome = run_transcript(
        lambda: make_session(max_errors=3),
        [(b"FOO\r\n", ["500"]), (b"FOO\r\n", ["500"]), (b"FOO\r\n", ["500", "421 4.7.0"]), (b"NOOP\r\n", [])],
    )
    assert outcome.closed


def test_junk_commands_count_as_errors_past_limit() -> None:
    config = hostile_config()
    config = config.replace(server=dataclasses.replace(config.server, max_junk_commands=3))
    outcome = run_transcript(
        lambda: make_session(config, max_errors=2),
        [
            (EHLO, ["250"]),
            (b"NOOP\r\n", ["250"]),
            (b"RSET\r\n", ["250"]),
            (b"VRFY alice\r\n", ["252"]),
            (b"NOOP\r\n", ["250", "421 4.7.0"]),
        ],
    )
    assert outcome.closed


def test_queued_replies_hold_back_commands() -> None:
    # A read of 100 HELP commands would queue about 12000 octets of replies.
    config = hostile_config()
    config = config.replace(server=dataclasses.replace(config.server, max_unsent_replies=1000))
    session = make_session(config)
    session.start()
    session.data_to_send()
    session.receive_data(EHLO + b"HELP\r\n" * 100)

    batches = [session.data_to_send()]
    while session.output_full and len(batches) < 1000:
        session.resume_input()
        batches.append(session.data_to_send())

    assert len(batches) > 10
    # The reply that reaches the limit is the last one queued, and none is longer than 200 octets.
    assert max(len(batch) for batch in batches) < 1000 + 200
    assert not session.output_full
    assert len(split_replies(b"".join(batches))) == 101


def test_unsent_replies_count_toward_limit() -> None:
    # The owner reports 900 of the 1000 octets allowed as unsent, so one HELP reply
    # (123 octets) passes the limit and the other commands wait.
    config = hostile_config()
    config = config.replace(server=dataclasses.replace(config.server, max_unsent_replies=1000))
    session = make_session(config)
    session.start()
    session.receive_data(EHLO)
    session.data_to_send()

    session.count_unsent(900)
    session.receive_data(b"HELP\r\n" * 5)

    assert session.output_full
    assert len(split_replies(session.data_to_send())) == 1
    session.count_unsent(0)
    session.resume_input()
    assert not session.output_full
    assert len(split_replies(session.data_to_send())) == 4


def test_empty_bdat_chunks_count_as_junk() -> None:
    # An empty chunk without LAST moves the message no further, so a client
    # looping on it reaches the error limit as with NOOP.
    config = hostile_config()
    config = config.replace(server=dataclasses.replace(config.server, max_junk_commands=3))
    outcome = run_transcript(
        lambda: make_session(config, max_errors=2),
        [
            (EHLO, ["250"]),
            (T, ["250", "250"]),
            (b"BDAT 0\r\n", ["250 2.0.0 0 octets"]),
            (b"BDAT 0\r\n", ["250 2.0.0 0 octets"]),
            (b"BDAT 0\r\n", ["250 2.0.0 0 octets"]),
            (b"BDAT 0\r\n", ["250 2.0.0 0 octets", "421 4.7.0"]),
        ],
    )
    assert outcome.closed


def test_bdat_chunks_with_data_not_junk() -> None:
    config = hostile_config()
    config = config.replace(server=dataclasses.replace(config.server, max_junk_commands=3))
    outcome = run_transcript(
        lambda: make_session(config, max_errors=2),
        [
            (EHLO, ["250"]),
            (T, ["250", "250"]),
            *[(b"BDAT 1\r\nx", ["250 2.0.0 1 octets"]) for _ in range(10)],
            (b"BDAT 0 LAST\r\n", ["250"]),
        ],
    )
    assert not outcome.closed
    assert outcome.messages[0].body == b"x" * 10


def test_accepted_message_clears_error_count() -> None:
    # As in Postfix, errors before a delivered message do not count against later ones.
    outcome = run_transcript(
        lambda: make_session(max_errors=2),
        [
            (EHLO, ["250"]),
            (b"EXPN staff\r\n", ["502"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (b"Subject: one\r\n\r\nbody\r\n.\r\n", ["250"]),
            (b"EXPN staff\r\n", ["502"]),
            (b"NOOP\r\n", ["250"]),
        ],
    )
    assert not outcome.closed
    assert len(outcome.messages) == 1


# -- DATA ---------------------------------------------------------------------


def test_size_limit_at_end_of_data() -> None:
    config = hostile_config(max_message_size=100)
    outcome = run_transcript(
        lambda: make_session(config),
        [
            (EHLO, ["250"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (b"Subject: big\r\n\r\n", []),
            (b"a" * 120 + b"\r\n", []),
            (b"a" * 120 + b"\r\n", []),
            (b".\r\n", ["552 5.3.4"]),
            (b"RSET\r\n", ["250"]),
            (b"MAIL FROM:<sender@example.com> SIZE=500\r\n", ["552 5.3.4"]),
        ],
    )
    assert outcome.messages == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"From: <sender@example.com>\r\nSubject: one\r\n\r\nbody\n.\r\nMAIL FROM:<spoof@example.org>\r\n"
                     b"RCPT TO:<rcpt@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n", id="lf-dot-crlf"),
        pytest.param(b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<spoof@example.org>\nRCPT TO:<rcpt@example.net>\n"
                     b"DATA\nx\r\n.\r\n", id="lf-dot-lf"),
        pytest.param(b"Subject: a\r\n\r\nbody\r\n.\nMAIL FROM:<spoof@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n"
                     b"BDAT 5 LAST\r\nhello\r\n.\r\n", id="crlf-dot-lf-bdat"),
        pytest.param(b"Subject: a\r\n\r\nline1\nline2\r\n.\r\n", id="bare-lf-in-body"),
        pytest.param(b"From: <sender@example.com>\r\nX-A: one\ntwo\r\nTo: <rcpt@example.net>\r\n\r\nbody\r\n.\r\n",
                     id="bare-lf-in-header"),
        pytest.param(b"Subject: a\r\n\r\nline1\rline2\r\n.\r\n", id="bare-cr-in-body"),
    ],
)
def test_smuggling_rejected(body: bytes) -> None:
    # Hostile input: a bare LF (or CR) next to the dot ended DATA in aiosmtpd,
    # Postfix, Sendmail, Exim and chasquid. Here it ends the connection.
    outcome = run_transcript(
        make_session,
        [(EHLO, ["250"]), (T + b"DATA\r\n", ["250", "250", "354"]), (body, ["521 5.5.2"])],
    )
    assert outcome.messages == []
    assert outcome.closed


def test_bare_lf_normalized_for_trusted() -> None:
    config = hostile_config(bare_lf="normalize")
    outcome = run_transcript(
        lambda: make_session(config),
        [(EHLO, ["250"]), (T + b"DATA\r\n", ["250", "250", "354"]),
         (b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<spoof@example.org>\r\n.\r\n", ["250"])],
    )
    assert outcome.messages[0].body == b"Subject: a\r\n\r\nbody\r\n.\r\nMAIL FROM:<spoof@example.org>\r\n"
    run_transcript(
        lambda: make_session(config, client=UNTRUSTED),
        [(EHLO, ["250"]), (T + b"DATA\r\n", ["250", "250", "354"]), (b"a\nb\r\n.\r\n", ["521 5.5.2"])],
    )


def test_bare_lf_normalized_size_limit() -> None:
    # Normalizing adds one octet for each bare line end, and the limit holds
    # for the message with those octets.  Each message below is within the
    # limit as sent: 92 octets become 152, 100 become 160, and 70 become 100.
    config = hostile_config(bare_lf="normalize", max_message_size=100)
    data_over = b"x" * 30 + b"\n" * 60 + b"\r\n"
    bdat_over = b"x" * 40 + b"\n" * 60
    at_limit = b"Subject: a\r\n\r\n" + b"x" * 24 + b"\n" * 30 + b"\r\n"
    assert (len(data_over), len(bdat_over), len(at_limit)) == (92, 100, 70)
    outcome = run_transcript(
        lambda: make_session(config),
        [
            (EHLO, ["250"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (data_over + b".\r\n", ["552 5.3.4"]),
            (T + b"BDAT 100 LAST\r\n" + bdat_over, ["250", "250", "552 5.3.4"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (at_limit + b".\r\n", ["250"]),
            (b"NOOP\r\n", ["250"]),
        ],
    )

    assert [len(message.body) for message in outcome.messages] == [100]


def test_bare_lf_lines_unstuffed_for_trusted() -> None:
    # A client that ends lines with bare LF stuffs the lines after them too.
    # A single leading dot there stays, because a client that does not stuff may have sent it.
    config = hostile_config(bare_lf="normalize")
    outcome = run_transcript(
        lambda: make_session(config),
        [(EHLO, ["250"]), (T + b"DATA\r\n", ["250", "250", "354"]),
         (b"Subject: a\n\n..one\n.two\r..three\r\n..four\n...\r\n.\r\n", ["250"])],
    )
    assert outcome.messages[0].body == b"Subject: a\r\n\r\n.one\r\n.two\r\n.three\r\n.four\r\n..\r\n"


def test_bdat_bare_line_ends_follow_policy() -> None:
    # Bare LF and bare CR in a BDAT message: rejected from an untrusted client,
    # normalized for a trusted one with bare_lf = "normalize".
    message = b"Subject: a\n\nbody\rx\n.\n"
    chunk = b"BDAT %d LAST\r\n" % len(message) + message
    run_transcript(
        lambda: make_session(client=UNTRUSTED),
        [(EHLO, ["250"]), (T, ["250", "250"]), (chunk, ["521 5.5.2"])],
    )
    config = hostile_config(bare_lf="normalize")
    outcome = run_transcript(
        lambda: make_session(config),
        [(EHLO, ["250"]), (T, ["250", "250"]), (chunk, ["250 2.0.0"])],
    )
    assert outcome.messages[0].body == b"Subject: a\r\n\r\nbody\r\nx\r\n.\r\n"


def test_repeated_recipient_stored_once() -> None:
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["250 2.1.5"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["250 2.1.5"]),
            (b"RCPT TO:<RCPT@Example.NET>\r\n", ["250 2.1.5"]),
            (b"DATA\r\n", ["354"]),
            (b"Subject: s\r\n\r\nbody\r\n.\r\n", ["250 2.0.0"]),
        ],
    )
    assert [r.address for r in outcome.messages[0].transaction.recipients] == ["rcpt@example.net"]


def test_long_body_lines_kept() -> None:
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (b"Subject: long\r\n\r\n" + b"b" * 3000 + b"\r\n.." + b"b" * 3000 + b"\r\n.\r\n", ["250"]),
            (b"NOOP\r\n", ["250"]),
        ],
    )
    assert outcome.messages[0].body == b"Subject: long\r\n\r\n" + b"b" * 3000 + b"\r\n." + b"b" * 3000 + b"\r\n"


def test_many_folded_header_lines() -> None:
    header = b"Subject: a\r\n" + b" b\r\n" * 100000
    outcome = run_transcript(
        make_session,
        [(EHLO, ["250"]), (T + b"DATA\r\n", ["250", "250", "354"]), (header + b"\r\nbody\r\n.\r\n", ["250"])],
    )
    assert outcome.messages[0].body == header + b"\r\nbody\r\n"


def test_mail_loop_detected() -> None:
    received = b"Received: from a.example by b.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    config = hostile_config(max_received_headers=50)
    outcome = run_transcript(
        lambda: make_session(config),
        [
            (EHLO, ["250"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (received * 60 + b"Subject: loop\r\n\r\nx\r\n.\r\n", ["554 5.4.6"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (received * 20 + b"Subject: loop\r\n\r\nx\r\n.\r\n", ["250"]),
        ],
    )
    assert len(outcome.messages) == 1


def test_mail_loop_limit_inclusive() -> None:
    received = b"Received: from a.example by b.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    config = hostile_config(max_received_headers=5)
    outcome = run_transcript(
        lambda: make_session(config),
        [
            (EHLO, ["250"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (received * 5 + b"Subject: at limit\r\n\r\nx\r\n.\r\n", ["250"]),
            (T + b"DATA\r\n", ["250", "250", "354"]),
            (received * 6 + b"Subject: past limit\r\n\r\nx\r\n.\r\n", ["554 5.4.6"]),
        ],
    )
    assert len(outcome.messages) == 1


def test_received_in_body_not_counted() -> None:
    received = b"Received: from a.example by b.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    config = hostile_config(max_received_headers=5)
    run_transcript(
        lambda: make_session(config),
        [(EHLO, ["250"]), (T + b"DATA\r\n", ["250", "250", "354"]),
         (b"Subject: s\r\n\r\n" + received * 10 + b".\r\n", ["250"])],
    )


def test_received_drops_ipv6_zone() -> None:
    # A link-local client's address comes from the socket with its zone ID
    # ("%eth0"), which an RFC 5321 IPv6 address literal cannot contain.
    header = received_header(
        helo_name="client.example.com",
        client_address="fe80::1%eth0",
        hostname="mx.example.test",
        protocol="ESMTP",
        queue_id="1K1XKBY1TP4Z9J2",
        recipients=["rcpt@example.net"],
    )
    first_line = header.split(b"\r\n", 1)[0]
    assert first_line == b"Received: from client.example.com (unknown [IPv6:fe80::1])"


def test_improper_pipelining_rejected() -> None:
    # The published smuggling attacks send the message without waiting for 354.
    data = EHLO + T + b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    outcome = feed(make_session(client=UNTRUSTED), [EHLO, data[len(EHLO):]])
    assert outcome.replies[1].startswith("250")
    assert [r[:9] for r in outcome.replies[2:]] == ["250 2.1.0", "250 2.1.5", "554 5.5.0"]
    assert outcome.closed
    assert outcome.messages == []


def test_pipelining_served_in_order_for_trusted() -> None:
    data = T + b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    outcome = feed(make_session(), [EHLO, data])
    assert [r[:3] for r in outcome.replies] == ["220", "250", "250", "250", "354", "250"]
    assert outcome.messages[0].body == b"Subject: x\r\n\r\nbody\r\n"


def test_replies_wait_for_store() -> None:
    session = make_session()
    session.start()
    session.receive_data(EHLO + T + b"DATA\r\n")
    session.data_to_send()
    session.receive_data(b"x\r\n.\r\nNOOP\r\n")
    events = session.events()
    assert isinstance(events[-1], MessageReady)
    assert session.data_to_send() == b""
    session.message_stored(replies.STORAGE_FAILURE)
    assert split_replies(session.data_to_send()) == [
        "452 4.3.1 Insufficient system storage, try again later",
        "250 2.0.0 OK",
    ]


# -- BDAT ---------------------------------------------------------------------


def test_bdat_transaction() -> None:
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (T, ["250", "250"]),
            (b"BDAT 12\r\nSubject: s\r\n", ["250 2.0.0"]),
            (b"BDAT 5 LAST\r\n\r\nx\r\n", ["250 2.0.0 Ok: queued as Q1"]),
            (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<rcpt@example.net>\r\nBDAT 0 LAST\r\n", ["250", "250", "250"]),
        ],
    )
    assert outcome.messages[0].body == b"Subject: s\r\n\r\nx\r\n"
    assert outcome.messages[1].body == b""


def test_bdat_size_leading_zeros() -> None:
    # RFC 3030 chunk-size is 1*DIGIT: zeros in front do not make a chunk too big.
    zeros = b"0" * 30
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (T, ["250", "250"]),
            (b"BDAT " + zeros + b"3\r\nabc", ["250 2.0.0 3 octets received"]),
            (b"BDAT " + zeros + b" LAST\r\n", ["250 2.0.0 Ok: queued as Q1"]),
        ],
    )
    assert outcome.messages[0].body == b"abc"


def test_refused_bdat_consumes_chunk() -> None:
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"BDAT 9 LAST\r\nMAIL FROM", ["503 5.5.1"]),
            (b"NOOP\r\n", ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<nosuchuser@example.net>\r\n"
             b"BDAT 27 LAST\r\nMAIL FROM:<x@example.org>\r\n", ["250", "550 5.1.1", "503"]),
            (b"RSET\r\n", ["250"]),
        ],
    )


def test_bdat_size_limit() -> None:
    config = hostile_config(max_message_size=10)
    outcome = run_transcript(
        lambda: make_session(config),
        [(EHLO, ["250"]), (T, ["250", "250"]), (b"BDAT 8\r\n12345678", ["250"]),
         (b"BDAT 8 LAST\r\n12345678", ["552 5.3.4"]), (b"BDAT 2 LAST\r\nab", ["503"]), (b"NOOP\r\n", ["250"])],
    )
    assert outcome.messages == []


@pytest.mark.parametrize(
    "line",
    [
        b"BDAT 12 MORE",
        b"BDAT -5",
        b"BDAT",
        b"BDAT x LAST",
        b"BDAT 5 LAST extra",
        b"BDAT 0x0c",
        b"BDAT 12\x00",
        b"BDAT\t5 LAST",
        b"bdat\t5",
        b"BDAT\r 5 LAST",
        b"BDAT\x00 5",
    ],
)
def test_bdat_syntax_error_closes(line: bytes) -> None:
    # Without a valid size the chunk cannot be skipped, so its text must not run as commands.
    outcome = run_transcript(
        lambda: make_session(client=UNTRUSTED),
        [
            (EHLO, ["250"]),
            (T, ["250", "250"]),
            (line + b"\r\nRSET\r\nNOOP\r\n", ["501 5.5.4 Invalid BDAT command, closing connection"]),
        ],
    )
    assert outcome.closed


def test_bdat_overlong_line_drops_chunk() -> None:
    # The size of an overlong BDAT line is still valid, so its chunk is read and
    # dropped.  The chunks pipelined after it do not complete the message.
    overlong = b"BDAT 27" + b" " * 600 + b"LAST\r\n"
    outcome = run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (T, ["250", "250"]),
            (b"BDAT 3\r\nabc", ["250 2.0.0"]),
            (overlong + b"MAIL FROM:<x@example.org>\r\n" + b"BDAT 3 LAST\r\nghi", ["500 5.5.2", "503 5.5.1"]),
            (b"NOOP\r\n", ["250"]),
        ],
    )
    assert not outcome.closed
    assert outcome.messages == []


def test_data_after_bdat_refused() -> None:
    run_transcript(
        make_session,
        [(EHLO, ["250"]), (T, ["250", "250"]), (b"BDAT 3\r\nabc", ["250"]), (b"DATA\r\n", ["503 5.5.1"])],
    )


# -- STARTTLS -----------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext() -> None:
    session = make_session()
    outcome = feed(
        session,
        [EHLO, b"STARTTLS\r\nMAIL FROM:<spoof@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n", EHLO, b"DATA\r\n"],
    )
    assert [r[:9] for r in outcome.replies] == ["220 mx.ex", "250-mx.ex", "220 2.0.0", "250-mx.ex", "503 5.5.1"]


def test_starttls_then_rset_injection() -> None:
    outcome = feed(make_session(), [EHLO, b"STARTTLS\r\nRSET\r\n", b"NOOP\r\n", b"QUIT\r\n"])
    assert [r[:3] for r in outcome.replies] == ["220", "250", "220", "250", "221"]


def test_starttls_resets_session() -> None:
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<a@example.com>\r\n", ["250"]),
            (b"STARTTLS\r\n", ["220"]),
            (b"MAIL FROM:<a@example.com>\r\n", ["503 5.5.1"]),
            (EHLO, ["250"]),
            (b"STARTTLS\r\n", ["503 5.5.1"]),
        ],
    )


def test_starttls_not_offered() -> None:
    run_transcript(lambda: make_session(starttls=False), [(EHLO, ["250"]), (b"STARTTLS\r\n", ["502 5.5.1"])])
    run_transcript(make_session, [(EHLO, ["250"]), (b"STARTTLS now\r\n", ["501"])])


# -- AUTH ---------------------------------------------------------------------


def test_auth_before_tls_refused() -> None:
    run_transcript(
        make_session,
        [
            (EHLO, ["250"]),
            (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["530 5.7.0"]),
            (b"STARTTLS\r\n", ["220"]),
            (EHLO, ["250"]),
            (b"AUTH LOGIN\r\n", ["334 VXNlcm5hbWU6"]),
            (b"*\r\n", ["501 5.7.0"]),
            (b"AUTH PLAIN\r\n", ["334"]),
            (b"*\r\n", ["501"]),
        ],
    )


def test_credentials_sent_after_refused_auth_are_not_logged() -> None:
    # The client sends its AUTH LOGIN password without waiting for the 334
    # prompt; AUTH is refused before TLS, so the password line fails as an
    # unknown command, and the logged Rejected event must not carry its text.
    session = make_session()
    session.start()
    secret = base64.b64encode(b"secret1")
    session.receive_data(EHLO + b"AUTH LOGIN YWxpY2U=\r\n" + secret + b"\r\nNOOP\r\nBOGUS\r\n")
    replies_sent = split_replies(session.data_to_send())
    logged = [event.command for event in session.events() if isinstance(event, Rejected)]

    assert [reply[:3] for reply in replies_sent] == ["220", "250", "530", "500", "250", "500"]
    assert logged == ["AUTH", "(hidden: sent after a refused AUTH)", "BOGUS"]
    assert not any(secret.decode() in command for command in logged)


@pytest.mark.parametrize("auth_line", [b"auth LOGIN YWxpY2U= extra", b"Auth", b"aUtH PLAIN a b"])
def test_credentials_hidden_after_lowercase_refused_auth(auth_line: bytes) -> None:
    # The parser rejects these AUTH lines, written in another letter case, as
    # malformed.  The password line behind them must still stay out of the log.
    session = make_session(auth_plaintext=True)
    session.start()
    secret = base64.b64encode(b"secret1")
    session.receive_data(EHLO + auth_line + b"\r\n" + secret + b"\r\n")
    replies_sent = split_replies(session.data_to_send())
    logged = [event.command for event in session.events() if isinstance(event, Rejected)]

    assert [reply[:3] for reply in replies_sent] == ["220", "250", "501", "500"]
    assert logged[1] == "(hidden: sent after a refused AUTH)"
    assert not any(secret.decode()[:8] in command for command in logged)


def test_auth_plain_and_login() -> None:
    run_transcript(
        lambda: make_session(implicit_tls=True),
        [
            (EHLO, ["250"]),
            (b"AUTH PLAIN =\r\n", ["535 5.7.8"]),
            (b"AUTH PLAIN\r\n", ["334"]),
            (b"=\r\n", ["535"]),
            (b"AUTH LOGIN\r\n", ["334 VXNlcm5hbWU6"]),
            (b"=\r\n", ["334 UGFzc3dvcmQ6"]),
            (b"=\r\n", ["535"]),
            (b"AUTH PLAIN !!!\r\n", ["501 5.5.2"]),
            (b"AUTH PLAIN " + PLAIN_BAD + b"\r\n", ["535 5.7.8"]),
            (b"AUTH CRAM-MD5\r\n", ["504"]),
            (b"AUTH LOGIN " + base64.b64encode(b"user") + b"\r\n", ["334 UGFzc3dvcmQ6"]),
            (base64.b64encode(b"pass") + b"\r\n", ["235 2.7.0"]),
            (b"AUTH LOGIN\r\n", ["503 5.5.1"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["503 5.5.1"]),
        ],
    )


def test_auth_empty_challenge_has_space() -> None:
    outcome = feed(make_session(implicit_tls=True), [EHLO, b"AUTH PLAIN\r\n"])
    assert outcome.raw.endswith(b"\r\n334 \r\n")


def test_auth_plain_with_challenge() -> None:
    run_transcript(
        lambda: make_session(implicit_tls=True),
        [(EHLO, ["250"]), (b"AUTH PLAIN\r\n", ["334"]), (PLAIN_OK + b"\r\n", ["235"])],
    )


def test_auth_authzid_must_match() -> None:
    other = base64.b64encode(b"admin\0user\0pass")
    same = base64.b64encode(b"user\0user\0pass")
    run_transcript(
        lambda: make_session(implicit_tls=True),
        [(EHLO, ["250"]), (b"AUTH PLAIN " + other + b"\r\n", ["535"]), (b"AUTH PLAIN " + same + b"\r\n", ["235"])],
    )


def test_auth_long_response_line() -> None:
    run_transcript(
        lambda: make_session(implicit_tls=True),
        [(EHLO, ["250"]), (b"AUTH LOGIN\r\n", ["334"]), (b"A" * 20000 + b"\r\n", ["500 5.5.6"]),
         (b"NOOP\r\n", ["250"])],
    )


def test_auth_unavailable_without_credentials() -> None:
    run_transcript(
        lambda: make_session(auth=False, implicit_tls=True),
        [(EHLO, ["250"]), (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["502 5.5.1"])],
    )


def test_parameters_after_helo_rejected() -> None:
    outcome = run_transcript(
        make_session,
        [
            (b"HELO client.example.com\r\n", ["250"]),
            (b"MAIL FROM:<sender@example.com> SIZE=100\r\n", ["555 5.5.4"]),
            (b"MAIL FROM:<sender@example.com> BODY=8BITMIME\r\n", ["555 5.5.4"]),
            (b"MAIL FROM:<sender@example.com> SMTPUTF8\r\n", ["555 5.5.4"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"RCPT TO:<rcpt@example.net> NOTIFY=NEVER\r\n", ["555 5.5.4"]),
            (b"RCPT TO:<rcpt@example.net> ORCPT=rfc822;rcpt@example.net\r\n", ["555 5.5.4"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["250"]),
            (b"DATA\r\n", ["354"]),
            (b"Subject: s\r\n\r\nx\r\n.\r\n", ["250 2.0.0 Ok: queued as Q1"]),
        ],
    )
    assert [message.transaction.size for message in outcome.messages] == [None]
    assert outcome.messages[0].protocol == "SMTP"


def test_parameters_after_ehlo_following_helo() -> None:
    run_transcript(
        make_session,
        [
            (b"HELO client.example.com\r\n", ["250"]),
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com> SIZE=100\r\n", ["250"]),
            (b"RCPT TO:<rcpt@example.net> NOTIFY=NEVER\r\n", ["250"]),
            (b"HELO client.example.com\r\n", ["250"]),
            (b"MAIL FROM:<sender@example.com> SIZE=100\r\n", ["555 5.5.4"]),
        ],
    )


def test_bdat_after_helo_rejected() -> None:
    # The chunk is still read, so its text never runs as commands, and the
    # chunks pipelined after it are rejected too.  DATA still works.
    outcome = run_transcript(
        make_session,
        [
            (b"HELO client.example.com\r\n", ["250"]),
            (T, ["250", "250"]),
            (
                b"BDAT 6\r\nRSET\r\n" + b"BDAT 5 LAST\r\nhello",
                ["503 5.5.1 BDAT is not accepted after HELO", "503 5.5.1"],
            ),
            (b"NOOP\r\n", ["250"]),
            (b"DATA\r\n", ["354"]),
            (b"Subject: s\r\n\r\nx\r\n.\r\n", ["250 2.0.0 Ok: queued as Q1"]),
        ],
    )
    assert [message.body for message in outcome.messages] == [b"Subject: s\r\n\r\nx\r\n"]


def test_auth_after_helo_refused() -> None:
    run_transcript(
        lambda: make_session(implicit_tls=True),
        [(b"HELO client.example.com\r\n", ["250"]), (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["503 5.5.1"])],
    )


# -- owner-driven endings -----------------------------------------------------


def test_timeout_reply() -> None:
    session = make_session()
    session.start()
    session.timeout()
    assert split_replies(session.data_to_send())[-1].startswith("421 4.4.2")
    assert session.closed


def test_shutdown_idle_and_in_data() -> None:
    idle = make_session()
    idle.start()
    idle.shutdown()
    assert split_replies(idle.data_to_send())[-1].startswith("421 4.3.2")
    assert idle.closed

    busy = make_session()
    busy.start()
    busy.receive_data(EHLO + T + b"DATA\r\nSubject: s\r\n")
    busy.shutdown()
    assert not busy.closed
    busy.receive_data(b"\r\nx\r\n.\r\n")
    events = busy.events()
    assert isinstance(events[-1], MessageReady)
    busy.message_stored(replies.queued("Q1"))
    tail = split_replies(busy.data_to_send())[-2:]
    assert tail[0].startswith("250 2.0.0 Ok: queued as Q1")
    assert tail[1].startswith("421 4.3.2")
    assert busy.closed


def test_shutdown_during_rejected_chunk() -> None:
    # The chunk is read to keep the framing, then the session ends at once.
    session = make_session()
    session.start()
    session.receive_data(EHLO + b"BDAT 10\r\nabc")
    session.data_to_send()
    session.shutdown()
    assert not session.closed

    session.receive_data(b"defghij")

    assert split_replies(session.data_to_send()) == [
        "503 5.5.1 Need MAIL command first",
        "421 4.3.2 Service shutting down, try again later",
    ]
    assert session.closed


def test_held_greeting_drops_early_talker() -> None:
    session = make_session(client=UNTRUSTED)
    session.start(delay_greeting=True)

    assert session.data_to_send() == b""
    session.receive_data(EHLO)

    assert split_replies(session.data_to_send()) == ["554 5.5.0 Protocol synchronization error, closing connection"]
    assert session.closed


def test_held_greeting_sent_by_greet() -> None:
    session = make_session(client=UNTRUSTED)
    session.start(delay_greeting=True)

    session.greet()
    session.receive_data(EHLO)

    replies_sent = split_replies(session.data_to_send())
    assert replies_sent[0].startswith("220 ")
    assert replies_sent[1].startswith("250")
    assert not session.closed


def test_trusted_client_greeted_at_once() -> None:
    session = make_session(client=TRUSTED)
    session.start(delay_greeting=True)

    assert split_replies(session.data_to_send())[0].startswith("220 ")


def test_bdat_size_past_ceiling_closes() -> None:
    # A chunk size past any int64 must give a reply, never an exception, and
    # relay will not read more than 1 TiB only to drop it.
    for size in (b"99999999999999999999999999", b"%d" % (MAX_DISCARDED_CHUNK + 1)):
        session = make_session(client=UNTRUSTED)

        outcome = feed(session, [EHLO, T, b"BDAT " + size + b" LAST\r\n", b"NOOP\r\n"])

        assert outcome.replies[-1].startswith("552 5.3.4")
        assert outcome.closed
        assert outcome.messages == []


def test_bdat_far_over_limit_read_and_dropped() -> None:
    # A chunk 30 times the limit is read to its end, so the commands inside it never run.
    config = hostile_config(max_message_size=10)
    chunk = b"MAIL FROM:<x@example.org>\r\n" * 10 + b"RSET\r\nQUIT\r\n"
    outcome = run_transcript(
        lambda: make_session(config, client=UNTRUSTED),
        [
            (EHLO, ["250"]),
            (T, ["250", "250"]),
            (b"BDAT %d LAST\r\n" % len(chunk) + chunk, ["552 5.3.4 Message size exceeds fixed maximum"]),
            (b"NOOP\r\n", ["250"]),
            (b"RCPT TO:<rcpt@example.net>\r\n", ["503 5.5.1"]),
            (T + b"BDAT 5 LAST\r\nhello", ["250", "250", "250 2.0.0 Ok: queued as Q1"]),
        ],
    )
    assert not outcome.closed
    assert [message.body for message in outcome.messages] == [b"hello"]


def test_bdat_over_limit_not_last_fails_transaction() -> None:
    # RFC 3030 section 2: chunks already pipelined after the failed one are
    # read and dropped too.  Each gets a 503, because the 552 ended the transaction.
    config = hostile_config(max_message_size=10)
    outcome = run_transcript(
        lambda: make_session(config),
        [
            (EHLO, ["250"]),
            (T, ["250", "250"]),
            (b"BDAT 4\r\nabcd", ["250 2.0.0"]),
            (b"BDAT 25\r\n" + b"RCPT TO:<x@example.org>\r\n" + b"BDAT 5 LAST\r\nhello",
             ["552 5.3.4", "503 5.5.1"]),
            (b"RSET\r\n", ["250"]),
            (T + b"BDAT 3 LAST\r\nabc", ["250", "250", "250 2.0.0 Ok: queued as Q1"]),
        ],
    )
    assert [message.body for message in outcome.messages] == [b"abc"]


@pytest.mark.parametrize("cut", [1, 7, 17, 18, 4096, 65535])
def test_bdat_over_limit_split_anywhere(cut: int) -> None:
    # The octets of a dropped chunk are counted exactly however the reads split them.
    config = hostile_config(max_message_size=10)
    chunk = b"\r\n.\r\nQUIT\r\n" * 7000
    data = b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n"
    outcome = feed(make_session(config, client=UNTRUSTED), [EHLO, T, data[:cut], data[cut:]])
    assert outcome.replies[-2:] == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.0.0 OK",
    ]
    assert not outcome.closed


def test_bdat_dropped_chunk_memory_bounded() -> None:
    # 256 MiB declared against the 10 MiB limit: each read is dropped as it
    # arrives, so neither the buffer nor the session keeps the chunk.
    session = make_session(client=UNTRUSTED)
    feed(session, [EHLO, T])
    piece = b"x" * 65536
    pieces = 4096
    session.receive_data(b"BDAT %d LAST\r\n" % (len(piece) * pieces))
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(pieces - 1):
            session.receive_data(piece)
            assert session.buffer.buffered == 0
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert session.in_data
    assert peak < 1024 * 1024
    session.receive_data(piece)
    assert split_replies(session.data_to_send())[-1].startswith("552 5.3.4")
    assert not session.in_data
    assert not session.closed


@pytest.mark.parametrize(("chunk", "octets"), [(b"BDAT 0\r\n", 0), (b"BDAT 2\r\nab", 2)])
def test_tiny_bdat_chunks_memory_bounded(chunk: bytes, octets: int) -> None:
    # Each chunk used to be kept as its own object: empty chunks grew memory
    # without any limit, and 2-octet ones by about 40 octets per chunk.
    count = 30000
    # Empty chunks count as junk commands, which would end the session long before.
    config = hostile_config()
    config = config.replace(server=dataclasses.replace(config.server, max_junk_commands=10 * count))
    session = make_session(config, client=UNTRUSTED)
    feed(session, [EHLO + T])
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            session.receive_data(chunk * (count // 10))
            session.data_to_send()
            while session.output_full:
                session.resume_input()
                session.data_to_send()
            assert session.events() == []
        growth = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert not session.closed
    assert growth < 2 * count * octets + 32 * 1024
    session.receive_data(b"BDAT 3 LAST\r\nxyz")
    events = session.events()
    assert len(events) == 1
    assert isinstance(events[0], MessageReady)
    assert events[0].body == b"ab" * (count if octets else 0) + b"xyz"


def test_catalog_wire_bytes_match_fresh_encoding() -> None:
    for name, reply in replies.CATALOG.items():
        fresh = replies.Reply(reply.code, reply.status, reply.lines)
        assert reply.wire == fresh.encode(), name


def test_unreadable_aliases_keep_old_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A changed aliases file that cannot be read keeps the names read before, with
    # one error line, instead of failing the RCPT that looked it up.
    aliases = tmp_path / "aliases"
    aliases.write_text("sales: alice\n")
    policy_file = _AliasFile(str(aliases))
    assert policy_file.names() == {"sales"}

    aliases.unlink()
    aliases.mkdir()  # a directory: it exists, but open() fails
    with caplog.at_level(logging.ERROR, logger="relay.smtp"):
        assert policy_file.names() == {"sales"}
        assert policy_file.names() == {"sales"}
    assert [r.getMessage() for r in caplog.records].count("aliases_error") <= 1
    assert any("aliases_error" in r.getMessage() or getattr(r, "event", "") == "aliases_error" for r in caplog.records)


# -- conformance details ---------------------------------------------------


def test_rcpt_with_dsn_parameters_beyond_512_octets() -> None:
    # RFC 5321 section 4.5.3.1.4 lets extensions lengthen command lines: a
    # 240-octet path with NOTIFY and a long ORCPT is a valid RCPT.
    path = "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 40 + ".example.net"
    rcpt = f"RCPT TO:<{path}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;{'x' * 300}@example.net\r\n".encode()
    assert 512 < len(rcpt) < 512 + 1024
    config = hostile_config(relay_domains=("example.org",))
    run_transcript(
        lambda: make_session(config),
        [(b"EHLO client.example.com\r\n", ["250"]), (b"MAIL FROM:<s@example.com>\r\n", ["250"]),
         (rcpt.replace(b".example.net>", b".example.org>"), ["250 2.1.5"]),
         (b"NOOP " + b"x" * 600 + b"\r\n", ["500 5.5.2"]),
         (b"MAIL FROM:<s@example.com> ENVID=" + b"x" * 1600 + b"\r\n", ["500 5.5.2"])],
    )


@pytest.mark.parametrize("local_part", ["victim%other.test", "other.test!victim", '"victim@other.test"'])
def test_sender_routing_to_relay_domain(local_part: str) -> None:
    # Postfix's allow_untrusted_routing = no: only privileged clients may route through a relay domain.
    config = hostile_config(relay_domains=("relay.test",))
    rcpt = f"RCPT TO:<{local_part}@relay.test>\r\n".encode()
    greeting = [(b"EHLO client.example.com\r\n", ["250"]), (b"MAIL FROM:<s@example.com>\r\n", ["250"])]
    run_transcript(lambda: make_session(config, client=UNTRUSTED), [*greeting, (rcpt, ["554 5.7.1"])])
    run_transcript(lambda: make_session(config, client=TRUSTED), [*greeting, (rcpt, ["250 2.1.5"])])
    run_transcript(
        lambda: make_session(config, client=UNTRUSTED), [*greeting, (b"RCPT TO:<victim@relay.test>\r\n", ["250"])]
    )


def test_greeting_name_echoed_printable_and_short() -> None:
    outcome = feed(
        make_session(),
        [b"EHLO \xc3\xa9xample.test\r\n", b"HELO " + b"h" * 400 + b"\r\n"],
    )

    assert outcome.replies[1].startswith("250-mx.example.test greets ?xample.test|")
    assert outcome.replies[2] == "250 mx.example.test greets " + "h" * 255
    assert all(len(line) + 2 <= 512 for reply in outcome.replies for line in reply.split("|"))


def test_auth_where_tls_cannot_start() -> None:
    # Without STARTTLS on the listener, AUTH is simply not available; asking for STARTTLS would mislead.
    run_transcript(
        lambda: make_session(starttls=False),
        [(b"EHLO client.example.com\r\n", ["250"]), (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["502 5.5.1"])],
    )
    run_transcript(
        lambda: make_session(starttls=True),
        [(b"EHLO client.example.com\r\n", ["250"]), (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["530 5.7.0"])],
    )


def test_rcpt_after_bdat_chunk_refused() -> None:
    outcome = run_transcript(
        make_session,
        [(b"EHLO client.example.com\r\n", ["250"]), (T, ["250", "250"]), (b"BDAT 5\r\nhello", ["250"]),
         (b"RCPT TO:<rcpt@example.net>\r\n", ["503 5.5.1"]), (b"BDAT 2 LAST\r\n\r\n", ["250 2.0.0"])],
    )
    assert len(outcome.messages[0].transaction.recipients) == 1


def test_invalid_aliases_keep_old_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # An edit that adds a target relay cannot deliver, or a loop, is not taken
    # up at RCPT: those aliases would pass RCPT and then bounce.
    aliases = tmp_path / "aliases"
    aliases.write_text("sales: alice\n")
    policy_file = _AliasFile(str(aliases))
    aliases.write_text("sales: alice\npipe: |/bin/true\nloop: pool\npool: loop\n")

    with caplog.at_level(logging.ERROR, logger="relay.smtp"):
        assert policy_file.names() == {"sales"}
        assert policy_file.names() == {"sales"}

    errors = [record for record in caplog.records if record.getMessage() == "aliases_error"]
    assert len(errors) == 1
    error = errors[0].fields["error"]  # type: ignore[attr-defined]
    assert "line 2: alias pipe: target '|/bin/true' is a command" in error
    assert "line 3: aliases form a loop, loop -> pool -> loop" in error

    # A valid file is taken up again.
    aliases.write_text("sales: alice\nsupport: alice\n")
    assert policy_file.names() == {"sales", "support"}


def test_alias_accepted_only_where_delivery_leads(tmp_path: Path) -> None:
    # An alias counts at RCPT only when delivery would find a mailbox or an
    # address behind it; otherwise it would be accepted and then bounced.
    (tmp_path / "mail" / "carol").mkdir(parents=True)
    aliases = tmp_path / "aliases"
    aliases.write_text(
        "ghost: nouser\nself: self\nselfplus: selfplus, carol\nchain: ghost, hop\nhop: carol\nout: bob@example.org\n"
    )
    config = hostile_config(local_domains=("local.test",))
    config = config.replace(
        local=dataclasses.replace(config.local, maildir_root=str(tmp_path / "mail"), aliases=str(aliases))
    )
    policy = RelayPolicy(config)

    refused = {name for name in ("ghost", "self") if policy.check_recipient(name, "local.test", False) is not None}
    accepted = {
        name for name in ("selfplus", "chain", "hop", "out", "carol")
        if policy.check_recipient(name, "local.test", False) is None
    }

    assert refused == {"ghost", "self"}
    assert accepted == {"selfplus", "chain", "hop", "out", "carol"}


@pytest.mark.parametrize(
    ("greeting", "data_line"),
    [
        (b"", b"DATA\r\n"),  # refused: no EHLO yet
        (b"EHLO client.example.com\r\n", b"DATA now\r\n"),  # refused: an argument
        (b"EHLO client.example.com\r\n", b"DATA" + b" " * 600 + b"\r\n"),  # refused: too long
        (b"EHLO client.example.com\r\n", b"DATA" + b" " * 3000 + b"\r\n"),  # dropped by the buffer
        # Unknown commands: a control character after the verb, as in a line
        # written through a text-mode stream that turned CRLF into CR CR LF.
        (b"EHLO client.example.com\r\n", b"DATA\r\r\n"),
        (b"EHLO client.example.com\r\n", b"DATA\x00\r\n"),
        (b"EHLO client.example.com\r\n", b"data\x0b\r\n"),
    ],
)
def test_every_refused_data_drops_text(greeting: bytes, data_line: bytes) -> None:
    # However DATA is refused, the text pipelined behind it never runs as commands.
    text = b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\nforged\r\n.\r\n"
    outcome = feed(make_session(client=TRUSTED), [greeting + T + data_line + text])

    assert outcome.replies[-1] == "554 5.5.0 Protocol synchronization error, closing connection"
    assert outcome.closed
    assert outcome.messages == []


@pytest.mark.parametrize("data_line", [b"DATA now\r\n", b"DATA" + b" " * 3000 + b"\r\n"])
def test_text_after_refused_data_is_logged(data_line: bytes) -> None:
    # The 554 that ends the session is logged as a rejection, like every other error reply.
    session = make_session(client=TRUSTED)
    session.start()
    session.receive_data(EHLO + T + data_line + b"MAIL FROM:<ceo@example.org>\r\n")
    rejected = [event for event in session.events() if isinstance(event, Rejected)]

    assert rejected[-1].reply.code == 554
    assert str(rejected[-1].reply.status) == "5.5.0"


@pytest.mark.parametrize("cut", [1540, 2000, 3003])
def test_text_after_overlong_data_split_reads(cut: int) -> None:
    # The buffer reports an overlong line once it passes the limit, which may
    # be a read before the line ends.  The text that arrives with the line's
    # end was still sent without waiting, so it never runs as commands.
    data_line = b"DATA" + b" " * 3000 + b"\r\n"
    text = b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n"
    pipelined = data_line + text
    outcome = feed(make_session(client=TRUSTED), [EHLO, T, pipelined[:cut], pipelined[cut:]])

    assert outcome.replies[-2] == "500 5.5.2 Line too long"
    assert outcome.replies[-1] == "554 5.5.0 Protocol synchronization error, closing connection"
    assert outcome.closed


def test_refused_data_error_limit_one_reply() -> None:
    # The refusal that reaches max_errors already closes with 421; no 554 follows it.
    outcome = feed(
        make_session(client=UNTRUSTED, max_errors=2),
        [
            b"EHLO client.example.com\r\n",
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\nx\r\n",
        ],
    )

    assert outcome.replies[-1].startswith("421 4.7.0")
    assert not any(reply.startswith("554 5.5.0") for reply in outcome.replies)
    assert outcome.closed


def test_wide_alias_accepted_like_delivery(tmp_path: Path) -> None:
    # The RCPT check limits the depth of the walk, as delivery does, not the aliases visited.
    (tmp_path / "mail" / "carol").mkdir(parents=True)
    aliases = tmp_path / "aliases"
    former = [f"former{n}: gone{n}" for n in range(1, 12)]
    members = ", ".join([*(f"former{n}" for n in range(1, 12)), "current"])
    aliases.write_text("\n".join([*former, "current: carol", f"staff: {members}"]) + "\n")
    config = hostile_config(local_domains=("local.test",))
    config = config.replace(
        local=dataclasses.replace(config.local, maildir_root=str(tmp_path / "mail"), aliases=str(aliases))
    )

    assert RelayPolicy(config).check_recipient("staff", "local.test", False) is None


def test_mailbox_case_agrees_with_delivery(tmp_path: Path) -> None:
    # Delivery folds the local part to lower case, so a folder named Bob is
    # no mailbox there; RCPT accepting it meant a 5.1.1 bounce after a 250.
    (tmp_path / "mail" / "Bob").mkdir(parents=True)
    (tmp_path / "mail" / "carol").mkdir()
    config = hostile_config(local_domains=("local.test",))
    config = config.replace(local=dataclasses.replace(config.local, maildir_root=str(tmp_path / "mail")))
    policy = RelayPolicy(config)
    delivery = LocalDelivery.from_config(config.local)

    for local_part in ("Bob", "bob", "BOB"):
        assert policy.check_recipient(local_part, "local.test", False) == replies.NO_SUCH_USER
        with pytest.raises(UnknownUser):
            delivery.expand(local_part)
    for local_part in ("carol", "Carol", "CAROL"):
        assert policy.check_recipient(local_part, "local.test", False) is None
        assert delivery.expand(local_part).users == ("carol",)


@pytest.mark.parametrize("client", [TRUSTED, UNTRUSTED])
def test_local_transport_domain_checks_user(tmp_path: Path, client: str) -> None:
    # A domain routed to "local" is delivered to the Maildirs, which bounce an
    # unknown user, so RCPT rejects that user as it does for a local domain.
    (tmp_path / "mail" / "carol").mkdir(parents=True)
    config = hostile_config(relay_domains=("hosted.test",))
    config = config.replace(
        local=dataclasses.replace(config.local, maildir_root=str(tmp_path / "mail")),
        delivery=dataclasses.replace(config.delivery, transport={"hosted.test": "local"}),
    )
    run_transcript(
        lambda: make_session(config, client=client),
        [
            (EHLO, ["250"]),
            (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
            (b"RCPT TO:<nobody@hosted.test>\r\n", ["550 5.1.1"]),
            (b"RCPT TO:<Carol@hosted.test>\r\n", ["250 2.1.5"]),
            (b"RCPT TO:<postmaster@hosted.test>\r\n", ["250 2.1.5"]),
            (b"RCPT TO:<carol%elsewhere.test@hosted.test>\r\n",
             ["550 5.1.1"] if client == TRUSTED else ["554 5.7.1"]),
        ],
    )
