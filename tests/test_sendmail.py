"""`relay sendmail`: option parsing, recipients from headers, Bcc removal, exit codes."""

from __future__ import annotations

import asyncio
import io
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import relay.sendmail as sendmail_module
from conftest import REPO_ROOT
from relay.sendmail import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOUSER,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_USAGE,
    SendmailError,
    inject,
    parse_options,
)
from relay.sendmail_addresses import qualify_address_list, split_address_list
from relay.spool import DeliveryResult, Envelope, Outcome, Recipient, Spool, SpoolStore, StoredMessage

# User and group ID of "nobody", which a child running as root switches to.
NOBODY = 65534


def write_config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "mail" / "alice").mkdir(parents=True)
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[server]
hostname = "mx.example.test"

[spool]
path = "spool"

[policy]
local_domains = ["example.test"]
max_message_size = 4096

[local]
maildir_root = "mail"
{extra}
"""
    )
    return config


def sendmail(args: list[str], message: bytes, argv0: str | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if argv0 is None:
        command = [sys.executable, "-m", "relay", "sendmail", *args]
    else:
        command = [argv0, *args]
    return subprocess.run(command, input=message, capture_output=True, env=env, check=False, timeout=60)


def stored_messages(spool: Path) -> list[tuple[StoredMessage, bytes]]:
    with SpoolStore(spool) as store:
        ids = store.queue_ids()
        result = []
        for message in store.messages(ids):
            assert isinstance(message, StoredMessage)
            result.append((message, store.load_body(message.queue_id)))
        return result


def test_t_option_takes_to_cc_bcc_and_removes_bcc(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    message = (
        b"From: App <app@example.test>\n"
        b"To: Alice <alice@example.test>, bob@example.net\n"
        b"Cc: carol@example.org\n"
        b"Bcc: dave@example.com,\n  erin@example.com\n"
        b"Subject: report\n"
        b"\n"
        b"line one\n"
    )

    result = sendmail(["--config", str(config), "-t", "-i"], message)

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == [
        "alice@example.test",
        "bob@example.net",
        "carol@example.org",
        "dave@example.com",
        "erin@example.com",
    ]
    assert b"Bcc:" not in body
    assert b"erin@example.com" not in body
    assert b"To: Alice <alice@example.test>, bob@example.net\r\n" in body
    assert body.endswith(b"\r\n\r\nline one\r\n")
    assert b"\n" not in body.replace(b"\r\n", b"")


@pytest.mark.parametrize(
    "envelope_lines",
    [
        b"From 2b1f0e6c Mon Sep 17 00:00:00 2001\n",
        b"From root  Sat Dec  5 10:00:00 2026\r\n>From old@example.net Fri Dec  4 09:00:00 2026\r\n",
    ],
)
def test_leading_mbox_from_line_dropped(tmp_path: Path, envelope_lines: bytes) -> None:
    config = write_config(tmp_path)
    message = (
        envelope_lines
        + b"From: App <app@example.test>\nTo: alice@example.test\nSubject: [PATCH] fix\n\nFrom here on\n"
    )

    result = sendmail(["--config", str(config), "-t"], message)

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == ["alice@example.test"]
    assert b"From root" not in body
    assert b"From 2b1f" not in body
    assert b">From" not in body
    assert b"\r\nFrom: App <app@example.test>\r\nTo: alice@example.test\r\n" in body
    assert body.count(b"From") == 2
    assert body.endswith(b"\r\n\r\nFrom here on\r\n")


def test_many_mbox_from_lines_linear_time() -> None:
    # 400,000 leading lines (3.2 MB): dropping them one copy at a time took
    # about 10 seconds, and the time grows with the square of the count.
    message = b"From x\r\n" * 400_000 + b"Subject: y\r\n\r\nbody\r\n"

    started = time.monotonic()
    result = sendmail_module._strip_envelope_lines(message)
    elapsed = time.monotonic() - started

    assert result == b"Subject: y\r\n\r\nbody\r\n"
    assert elapsed < 2


def test_t_address_list_syntax(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    message = (
        b"To: ops@example.net <pager@example.net>, \"Doe, John\" <jd@example.net>\n"
        b"Cc: Team: a@example.org (Ann, ops), <@hop.example:b@example.org>;, undisclosed-recipients:;\n"
        b"Bcc: \"odd <x@example.com>\" <y@example.com>,\n\tz@example.com\n"
        b"\n"
        b"body\n"
    )

    result = sendmail(["--config", str(config), "-t"], message)

    assert result.returncode == 0, result.stderr
    [(stored, _)] = stored_messages(tmp_path / "spool")
    # The name before <pager@...> looks like an address but is only shown to the reader.
    assert [r.address for r in stored.recipients] == [
        "pager@example.net",
        "jd@example.net",
        "a@example.org",
        "b@example.org",
        "y@example.com",
        "z@example.com",
    ]


@pytest.mark.parametrize(
    ("text", "addresses"),
    [
        ("a@example.net <b@example.net>", ["b@example.net"]),
        ('"a b"@example.net, x@[IPv6:2001:db8::1]', ['"a b"@example.net', "x@[IPv6:2001:db8::1]"]),
        ('Al (the (nested) \\) one) <a@example.net>, "q\\"x" <q@example.net>', ["a@example.net", "q@example.net"]),
        ("a@example.net,\r\n\tb@example.net, , ;", ["a@example.net", "b@example.net"]),
        ("undisclosed-recipients:;", []),
        ("John Doe", ["John Doe"]),
    ],
)
def test_split_address_list(text: str, addresses: list[str]) -> None:
    assert split_address_list(text) == addresses


@pytest.mark.parametrize(
    ("text", "qualified"),
    [
        ("root", "root@example.test"),
        ("root (Cron Daemon)", "root@example.test (Cron Daemon)"),
        ("Cron Daemon <root>", "Cron Daemon <root@example.test>"),
        (" alice,\r\n\tbob@example.net, carol ", " alice@example.test,\r\n\tbob@example.net, carol@example.test "),
        ('"john doe"', '"john doe"@example.test'),
        ('"Doe, John" <jd>', '"Doe, John" <jd@example.test>'),
        ("team: a, b@example.net;", "team: a@example.test, b@example.net;"),
        ("undisclosed-recipients:;", "undisclosed-recipients:;"),
        ("<>", "<>"),
        ("user@", "user@"),
        ("<@hop.example:b@example.org>", "<@hop.example:b@example.org>"),
        # Not a local part, so the text stays as it is.
        ("John Doe", "John Doe"),
        ("Müller", "Müller@example.test"),
    ],
)
def test_qualify_address_list(text: str, qualified: str) -> None:
    assert qualify_address_list(text, "example.test") == qualified


def test_qualify_address_list_never_raises() -> None:
    generator = random.Random(5321)
    alphabet = 'a@.<>(),;:"\\[] \t\r\nü'
    for _ in range(2000):
        text = "".join(generator.choice(alphabet) for _ in range(generator.randrange(40)))
        qualified = qualify_address_list(text, "example.test")
        assert qualified.replace("@example.test", "") == text.replace("@example.test", ""), text


def test_cron_message_header_addresses_qualified(tmp_path: Path) -> None:
    # The fields cron writes, with bare user names that only the local host can read.
    config = write_config(tmp_path)
    (tmp_path / "mail" / "root").mkdir()
    message = (
        b"From: root (Cron Daemon)\nTo: root\nCc: Ops <alice>, bob@example.net\n"
        b"Reply-To: alice\nSubject: Cron <root@host> date\nX-Note: root\n\nroot\n"
    )

    result = sendmail(["--config", str(config), "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], message)

    assert result.returncode == 0, result.stderr
    [(_, body)] = stored_messages(tmp_path / "spool")
    assert b"\r\nFrom: root@example.test (Cron Daemon)\r\n" in body
    assert b"\r\nTo: root@example.test\r\n" in body
    assert b"\r\nCc: Ops <alice@example.test>, bob@example.net\r\n" in body
    assert b"\r\nReply-To: alice@example.test\r\n" in body
    # Other fields and the body keep their text.
    assert b"\r\nSubject: Cron <root@host> date\r\n" in body
    assert b"\r\nX-Note: root\r\n" in body
    assert body.endswith(b"\r\n\r\nroot\r\n")


def test_header_addresses_qualified_in_bs_mode(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    session = (
        b"EHLO client.example.test\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        b"From: alice\r\nTo: Alice <alice>\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )

    result = sendmail(["--config", str(config), "-bs"], session)

    assert result.returncode == 0, result.stderr
    [(_, body)] = stored_messages(tmp_path / "spool")
    assert b"\r\nFrom: alice@example.test\r\n" in body
    assert b"\r\nTo: Alice <alice@example.test>\r\n" in body


def test_split_address_list_never_raises() -> None:
    generator = random.Random(5322)
    alphabet = 'a@.<>(),;:"\\[] \t\r\nü'
    for _ in range(2000):
        text = "".join(generator.choice(alphabet) for _ in range(generator.randrange(40)))
        result = split_address_list(text)
        assert all(isinstance(address, str) and address for address in result), text


def test_argument_is_address_list(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "alice, Bob <bob@example.net>", "<carol@example.org>"], b"x\n")

    assert result.returncode == 0, result.stderr
    [(stored, _)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == ["alice@example.test", "bob@example.net", "carol@example.org"]


def test_t_resent_fields_replace_to_cc_bcc(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    message = (
        b"Resent-From: ops@example.test\n"
        b"Resent-To: Desk <desk@example.net>\n"
        b"Resent-Bcc: audit@example.org\n"
        b"From: App <app@example.test>\n"
        b"To: alice@example.test\n"
        b"Bcc: bob@example.net\n"
        b"Subject: resent report\n"
        b"\n"
        b"body\n"
    )

    result = sendmail(["--config", str(config), "-t"], message)

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    # The first recipients (To, Bcc) already had the message.
    assert [r.address for r in stored.recipients] == ["desk@example.net", "audit@example.org"]
    assert b"audit@example.org" not in body
    assert b"bob@example.net" not in body
    assert b"Resent-To: Desk <desk@example.net>\r\n" in body
    assert b"To: alice@example.test\r\n" in body


def test_t_reads_fields_with_space_before_colon(tmp_path: Path) -> None:
    # RFC 5322 section 4.5 allows white space before the colon in a field
    # that is read, and Postfix's cleanup takes such a To or Cc for -t.
    config = write_config(tmp_path)
    message = (
        b"X-Mailer : cron\n"
        b"To : alice@example.test\n"
        b"Cc: bob@example.net,\n carol@example.org\n"
        b"Bcc\t: dave@example.com\n"
        b"Subject: report\n"
        b"\n"
        b"body\n"
    )

    result = sendmail(["--config", str(config), "-t"], message)

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == [
        "alice@example.test",
        "bob@example.net",
        "carol@example.org",
        "dave@example.com",
    ]
    assert b"dave@example.com" not in body


def test_t_resent_field_with_space_before_colon(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    message = b"Subject : resent\nResent-To : desk@example.net\nTo: alice@example.test\n\nbody\n"

    result = sendmail(["--config", str(config), "-t"], message)

    assert result.returncode == 0, result.stderr
    [(stored, _)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == ["desk@example.net"]


def test_t_resent_without_recipients(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-t"], b"Resent-From: ops@example.test\nTo: alice\n\nbody\n")

    assert result.returncode == EX_USAGE
    assert "the message has no Resent-To, Resent-Cc or Resent-Bcc address" in result.stderr.decode()


def test_default_sender_ignores_login_variables(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LOGNAME": "postmaster", "USER": "postmaster"}
    command = [sys.executable, "-m", "relay", "sendmail", "--config", str(config), "alice"]

    result = subprocess.run(command, input=b"x\n", capture_output=True, env=env, check=False, timeout=60)

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    account = pwd.getpwuid(os.getuid()).pw_name
    assert stored.envelope.sender == f"{account}@example.test"
    assert f"From: {account}@example.test\r\n".encode() in body


def test_f_takes_mailbox_with_name(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-f", "App (cron) <app@example.net>", "alice"], b"x\n")

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert stored.envelope.sender == "app@example.net"
    assert b"From: app@example.net\r\n" in body


@pytest.mark.parametrize(
    ("message", "header", "body"),
    [
        (b"Disk usage on /dev/sda1: 95%\n", b"", b"Disk usage on /dev/sda1: 95%\r\n"),
        (b"hello\nworld", b"", b"hello\r\nworld\r\n"),
        (b" indented first line\n", b"", b" indented first line\r\n"),
        (b"Subject: report\n  folded\nbody without empty line\n", b"Subject: report\r\n  folded\r\n",
         b"body without empty line\r\n"),
        (b"Subject: kept\n\nbody\n", b"Subject: kept\r\n", b"body\r\n"),
    ],
)
def test_text_without_header_becomes_body(tmp_path: Path, message: bytes, header: bytes, body: bytes) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "alice"], message)

    assert result.returncode == 0, result.stderr
    [(_, stored)] = stored_messages(tmp_path / "spool")
    stored_header, separator, stored_body = stored.partition(b"\r\n\r\n")
    assert separator
    assert stored_body == body
    # Received (two lines), then the added Date, Message-ID and From, then the message's own fields.
    lines = (stored_header + b"\r\n").splitlines(keepends=True)
    assert lines[2].startswith(b"Date: ")
    assert lines[3].startswith(b"Message-ID: ")
    assert lines[4].startswith(b"From: ")
    assert b"".join(lines[5:]) == header


def test_bcc_removed_without_t(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    message = (
        b"To: alice@example.test\nBcc: secret@example.net,\n  other@example.net\nResent-Bcc: r@example.net\n\nhi\n"
    )

    result = sendmail(["--config", str(config), "alice", "secret@example.net"], message)

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == ["alice@example.test", "secret@example.net"]
    assert b"secret@example.net" not in body
    assert b"other@example.net" not in body
    assert b"r@example.net" not in body
    assert b"To: alice@example.test\r\n\r\nhi\r\n" in body


@pytest.mark.parametrize("field", [b"From: App <app@example.test>", b"FROM : App <app@example.test>"])
def test_from_field_kept_not_added(tmp_path: Path, field: bytes) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "alice"], field + b"\nSubject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    [(_, body)] = stored_messages(tmp_path / "spool")
    assert body.lower().count(b"\r\nfrom") == 1
    assert field + b"\r\n" in body


@pytest.mark.parametrize(
    "fields",
    [
        b"Date : Thu, 1 Jan 2026 00:00:00 +0000\nMessage-ID : <a@example.test>\nFrom : app@example.test\n",
        b"date\t:Thu, 1 Jan 2026 00:00:00 +0000\nMESSAGE-ID  : <a@example.test>\nfrom :app@example.test\n",
    ],
)
def test_fields_with_space_before_colon_not_added(tmp_path: Path, fields: bytes) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "alice"], fields + b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    [(_, body)] = stored_messages(tmp_path / "spool")
    # Only the Received header (two lines) comes before the message's own fields.
    _, _, rest = body.split(b"\r\n", 2)
    assert rest == fields.replace(b"\n", b"\r\n") + b"Subject: x\r\n\r\nhi\r\n"


def test_f_sets_reverse_path(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-f", "bounces@example.test", "alice"], b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert stored.envelope.sender == "bounces@example.test"
    assert [r.address for r in stored.recipients] == ["alice@example.test"]
    assert body.startswith(b"Received: by mx.example.test (relay, from userid ")
    assert b"\r\nDate: " in body
    assert b"\r\nMessage-ID: <" in body
    assert b"\r\nFrom: bounces@example.test\r\n" in body


# server.hostname is MX.example.test. local_domains contains lower-case names, and
# the host name matches them regardless of case but is appended as written.
@pytest.mark.parametrize(
    ("local_domains", "domain"),
    [
        # The host name is appended when it is a local domain, even when not listed first.
        ('["example.test", "mx.example.test"]', "MX.example.test"),
        # Otherwise the first local domain, so the bare name stays local.
        ('["example.test", "other.test"]', "example.test"),
        # With no local domains nothing is delivered locally: the host name.
        ("[]", "MX.example.test"),
    ],
)
def test_bare_names_get_origin_domain(tmp_path: Path, local_domains: str, domain: str) -> None:
    (tmp_path / "mail" / "alice").mkdir(parents=True)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nhostname = "MX.example.test"\n[spool]\npath = "spool"\n'
        f'[policy]\nlocal_domains = {local_domains}\n[local]\nmaildir_root = "mail"\n'
    )

    result = sendmail(["--config", str(config), "alice"], b"Subject: x\n\nhi\n")
    with_sender = sendmail(["--config", str(config), "-f", "cron", "alice"], b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    assert with_sender.returncode == 0, with_sender.stderr
    stored = sorted(stored_messages(tmp_path / "spool"), key=lambda item: item[0].arrival)
    [(default, default_body), (explicit, _)] = stored
    assert [r.address for r in default.recipients] == [f"alice@{domain}"]
    assert default.envelope.sender.endswith(f"@{domain}")
    assert f"\r\nFrom: {default.envelope.sender}\r\n".encode() in default_body
    assert explicit.envelope.sender == f"cron@{domain}"


def test_null_sender_and_full_name(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-f", "<>", "-F", "Cron Daemon", "alice"], b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert stored.envelope.sender == ""
    assert b'From: "Cron Daemon" <' in body


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ('John "Q" Doe', b'From: "John \\"Q\\" Doe" <'),
        ("J\u00f6hn <Doe>", b"From: =?utf-8?b?SsO2aG4gPERvZT4=?= <"),
        ("Evil\nBcc: x@example.net", b'From: "Evil Bcc: x@example.net" <'),
        # Long enough to fold: the fold must use CRLF like the rest of the message.
        ("Zo\u00eb " + "Featherstonehaugh " * 5, b"From: =?utf-8?q?Zo=C3=AB_Featherstonehaugh"),
    ],
)
def test_full_name_quoted_or_encoded(tmp_path: Path, name: str, field: bytes) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-F", name, "alice"], b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    [(_, body)] = stored_messages(tmp_path / "spool")
    assert field in body
    assert b"\r\nBcc:" not in body
    assert b"\n" not in body.replace(b"\r\n", b"")


def test_full_name_not_utf8_is_usage_error(tmp_path: Path) -> None:
    # A Latin-1 name from a script's locale: os.fsencode sends the raw octet 0xE9.
    config = write_config(tmp_path)
    name = b"Ren\xe9".decode("utf-8", "surrogateescape")

    result = sendmail(["--config", str(config), "-F", name, "alice@example.test"], b"Subject: x\n\nhi\n")

    assert result.returncode == EX_USAGE, result.stderr
    assert "invalid -F value" in result.stderr.decode()
    assert "internal error" not in result.stderr.decode()
    assert not (tmp_path / "spool" / "spool.db").exists() or stored_messages(tmp_path / "spool") == []


def test_lone_dot_ends_input_without_i(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "alice"], b"Subject: x\n\nbefore\n.\nafter\n")

    assert result.returncode == 0, result.stderr
    [(_, body)] = stored_messages(tmp_path / "spool")
    assert body.endswith(b"\r\nbefore\r\n")


def message_of_size(size: int) -> bytes:
    """Return a message of exactly ``size`` octets, with CRLF line ends, so none grows when stored."""
    head = b"Subject: x\r\n\r\n"
    return head + b"y" * (size - len(head) - 2) + b"\r\n"


@pytest.mark.parametrize("terminator", [b".\n", b".\r\n"])
def test_lone_dot_right_after_limit_ends_input(tmp_path: Path, terminator: bytes) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "alice"], message_of_size(4096) + terminator + b"after\n")

    assert result.returncode == 0, result.stderr
    [(_, body)] = stored_messages(tmp_path / "spool")
    assert body.endswith(b"yy\r\n")


def test_dot_line_past_limit_not_end_of_input(tmp_path: Path) -> None:
    # The octet after the limit is a "." that starts a longer line, not a lone dot.
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "alice"], message_of_size(4096) + b".signature\r\nmore\r\n")

    assert result.returncode == EX_DATAERR, result.stderr
    assert "exceeds policy.max_message_size" in result.stderr.decode()
    assert not (tmp_path / "spool" / "spool.db").exists() or stored_messages(tmp_path / "spool") == []


# A writer that dies of SIGPIPE when its reader exits early, as a Perl or
# shell script does by default, and exits with the status of sendmail otherwise.
PIPE_WRITER = """
import signal, subprocess, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
child = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE)
child.stdin.write(b"Subject: x\\n\\n" + b"y\\n" * int(sys.argv[1]))
child.stdin.close()
sys.exit(child.wait())
"""


@pytest.mark.parametrize("options", [[], ["-i"]])
def test_too_large_input_read_to_end(tmp_path: Path, options: list[str]) -> None:
    # 400,000 octets fill the pipe many times over after sendmail has read 4,096.
    config = write_config(tmp_path)
    command = [sys.executable, "-m", "relay", "sendmail", "--config", str(config), *options, "alice"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    result = subprocess.run(
        [sys.executable, "-c", PIPE_WRITER, "200000", *command],
        capture_output=True, env=env, check=False, timeout=60,
    )

    assert result.returncode == EX_DATAERR, result.stderr
    assert "exceeds policy.max_message_size" in result.stderr.decode()
    assert not (tmp_path / "spool" / "spool.db").exists() or stored_messages(tmp_path / "spool") == []


def test_discard_input_stops_at_lone_dot() -> None:
    stream = io.BytesIO(b"y" * 100 + b"\n.\nafter\n")

    sendmail_module.discard_input(stream, ignore_dots=False, at_line_start=False, seconds=60)

    assert stream.read() == b"after\n"


def test_discard_input_dot_inside_line() -> None:
    # The read starts inside a line, so its "." is no lone dot.
    stream = io.BytesIO(b".\nmore\n.\r\nafter\n")

    sendmail_module.discard_input(stream, ignore_dots=False, at_line_start=False, seconds=60)

    assert stream.read() == b"after\n"


def test_discard_input_with_i_reads_to_end() -> None:
    stream = io.BytesIO(b"x\n.\n" + b"y" * 200_000)

    sendmail_module.discard_input(stream, ignore_dots=True, at_line_start=True, seconds=60)

    assert stream.read() == b""


def test_lone_dot_kept_with_oi(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-oi", "alice"], b"Subject: x\n\nbefore\n.\nafter\n")

    assert result.returncode == 0, result.stderr
    [(_, body)] = stored_messages(tmp_path / "spool")
    assert body.endswith(b"\r\nbefore\r\n.\r\nafter\r\n")


def test_program_name_sendmail(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    link = tmp_path / "sendmail"
    link.write_text(f"#!{sys.executable}\nimport sys\nfrom relay.cli import main\nsys.exit(main())\n")
    link.chmod(0o755)

    result = sendmail(["--config", str(config), "-bm", "-odi", "alice"], b"Subject: x\n\nhi\n", argv0=str(link))

    assert result.returncode == 0, result.stderr
    assert len(stored_messages(tmp_path / "spool")) == 1


def test_program_name_sendmail_logs_fields(tmp_path: Path) -> None:
    # An aliases file with an invalid line: looking up a local user logs aliases_error.
    (tmp_path / "aliases").write_text("root ops@example.test\n")
    config = write_config(tmp_path, 'aliases = "aliases"')
    link = tmp_path / "sendmail"
    link.write_text(f"#!{sys.executable}\nimport sys\nfrom relay.cli import main\nsys.exit(main())\n")
    link.chmod(0o755)

    result = sendmail(["--config", str(config), "root"], b"Subject: x\n\nhi\n", argv0=str(link))
    stderr = result.stderr.decode()

    assert result.returncode == EX_NOUSER, stderr
    # The line carries its level and fields, as under `relay sendmail`, not the bare event name.
    assert "error relay." in stderr
    assert "aliases_error file=" in stderr


def program_link(tmp_path: Path, name: str) -> Path:
    """Write an executable named ``name`` that runs relay's main, as a symlink to relay would."""
    link = tmp_path / name
    link.write_text(f"#!{sys.executable}\nimport sys\nfrom relay.cli import main\nsys.exit(main())\n")
    link.chmod(0o755)
    return link


@pytest.mark.parametrize(("program", "args"), [("mailq", []), ("sendmail", ["-bp"])])
def test_mailq_lists_queue(tmp_path: Path, program: str, args: list[str]) -> None:
    config = write_config(tmp_path)
    assert sendmail(["--config", str(config), "alice"], b"Subject: x\n\nhi\n").returncode == 0
    [(stored, _)] = stored_messages(tmp_path / "spool")

    result = sendmail(["--config", str(config), *args], b"", argv0=str(program_link(tmp_path, program)))

    assert result.returncode == 0, result.stderr
    assert stored.queue_id in result.stdout.decode()
    assert "alice@example.test" in result.stdout.decode()


@pytest.mark.parametrize(("program", "args"), [("newaliases", []), ("sendmail", ["-bi"]), ("sendmail", ["-I"])])
def test_newaliases_checks_aliases(tmp_path: Path, program: str, args: list[str]) -> None:
    aliases = tmp_path / "aliases"
    config = write_config(tmp_path, 'aliases = "aliases"')
    link = program_link(tmp_path, program)

    aliases.write_text("postmaster: alice\nbuild: |/usr/bin/make\n")
    invalid = sendmail(["--config", str(config), *args], b"", argv0=str(link))
    aliases.write_text("postmaster: alice\n")
    valid = sendmail(["--config", str(config), *args], b"", argv0=str(link))

    assert invalid.returncode == EX_CONFIG
    assert "line 2: alias build: target '|/usr/bin/make' is a command" in invalid.stderr.decode()
    assert valid.returncode == 0, valid.stderr
    assert "is valid; reload relay serve (SIGHUP) to use it" in valid.stderr.decode()
    assert not (tmp_path / "spool" / "spool.db").exists()


def test_newaliases_without_aliases_file(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config)], b"", argv0=str(program_link(tmp_path, "newaliases")))

    assert result.returncode == 0
    assert result.stderr.decode() == (
        "newaliases: no aliases file is configured (local.aliases is not set); there is nothing to check\n"
    )


def test_newaliases_config_errors_name_newaliases(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[server]\nbogus = 1\n")

    result = sendmail(["--config", str(config)], b"", argv0=str(program_link(tmp_path, "newaliases")))

    assert result.returncode == EX_CONFIG
    assert result.stderr.decode().startswith(f"newaliases: {config}:server.bogus: unknown key")


@pytest.mark.parametrize(("program", "usage"), [("mailq", "usage: mailq"), ("newaliases", "usage: newaliases")])
def test_program_link_help(tmp_path: Path, program: str, usage: str) -> None:
    result = sendmail(["--help"], b"", argv0=str(program_link(tmp_path, program)))

    assert result.returncode == 0
    assert result.stdout.decode().startswith(usage)
    assert "sendmail [--config" not in result.stdout.decode()


def test_mailq_errors_name_mailq(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{tmp_path / "absent" / "spool"}"\n')
    link = program_link(tmp_path, "mailq")

    missing_spool = sendmail(["--config", str(config)], b"", argv0=str(link))
    bad_option = sendmail(["-x"], b"", argv0=str(link))
    invalid = tmp_path / "invalid.toml"
    invalid.write_text("[server]\nbogus = 1\n")
    bad_config = sendmail(["--config", str(invalid)], b"", argv0=str(link))

    assert missing_spool.returncode == 1
    assert missing_spool.stderr.decode().startswith("mailq: ")
    assert bad_option.returncode == EX_USAGE
    assert bad_option.stderr.decode().startswith("mailq: unknown option -x")
    assert bad_config.returncode == 1
    assert bad_config.stderr.decode().startswith(f"mailq: {invalid}:server.bogus: unknown key")
    assert bad_config.stderr.decode().count("\n") == 1


@pytest.mark.parametrize("hop_count", [["-h", "5"], ["-h17"]])
def test_hop_count_ignored(tmp_path: Path, hop_count: list[str]) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), *hop_count, "alice"], b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    assert b"usage:" not in result.stdout
    [(stored, _)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == ["alice@example.test"]


def test_help_prints_usage_and_queues_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "--help", "alice"], b"Subject: x\n\nhi\n")

    assert result.returncode == 0
    assert result.stdout.startswith(b"usage: relay sendmail ")
    assert b"-h N" in result.stdout
    synopsis = result.stdout.split(b"\n\n")[0]
    assert b"[-bm|-bp|-bi|-I]" in synopsis
    assert b"-q|-qRDOMAIN|-qIQUEUEID" in synopsis
    assert not (tmp_path / "spool" / "spool.db").exists()


@pytest.mark.parametrize(
    ("args", "message", "status", "fragment"),
    [
        (["-x", "alice"], b"x\n", EX_USAGE, "unknown option -x"),
        (["-bv", "alice"], b"", EX_USAGE, "mode -bv is not supported; use -bm (deliver a message), -bs (SMTP on"),
        (["-bp", "alice"], b"", EX_USAGE, "-bp reads no message, so it takes no recipient"),
        ([], b"Subject: x\n\nhi\n", EX_USAGE, "no recipients"),
        (["-f"], b"", EX_USAGE, "needs a value"),
        # -h takes a hop count; alone or with a bad one it is a usage error, not help.
        (["-h"], b"Subject: x\n\nhi\n", EX_USAGE, "option -h needs a value"),
        (["-h", "five", "alice"], b"Subject: x\n\nhi\n", EX_USAGE, "invalid hop count 'five' for -h"),
        (["-h-1", "alice"], b"Subject: x\n\nhi\n", EX_USAGE, "invalid hop count '-1' for -h"),
        (["nobody"], b"x\n", EX_NOUSER, "unknown local user 'nobody@example.test'"),
        (["bad address@example.net"], b"x\n", EX_NOUSER, "invalid recipient address"),
        (["-f", "a b@c", "alice"], b"x\n", EX_NOUSER, "invalid sender address"),
        (["-f", "a@example.net, b@example.net", "alice"], b"x\n", EX_NOUSER, "give one address, such as -f"),
        (["alice"], b"Subject: x\n\n" + b"y" * 5000, EX_DATAERR, "exceeds policy.max_message_size (4096 octets"),
        # 3,000 LF line ends take 3,000 octets more once stored with CRLF.
        (["alice"], b"Subject: x\n\n" + b"\n" * 3000, EX_DATAERR, "exceeds policy.max_message_size (4096 octets"),
        (["-i", "alice"], b"Subject: x\n\n" + b"\n" * 3000, EX_DATAERR, "exceeds policy.max_message_size (4096 octets"),
        # Far over the limit, and in one line: read only up to the limit, then refused.
        (["alice"], b"Subject: x\n\n" + b"y" * 20_000_000, EX_DATAERR, "exceeds policy.max_message_size"),
        # The SMTP server's rules: a loopback address literal never passes.
        (["x@[127.0.0.1]"], b"x\n", EX_NOUSER, "rejected: 550 5.7.1 Address literal not accepted"),
    ],
)
def test_exit_codes(tmp_path: Path, args: list[str], message: bytes, status: int, fragment: str) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), *args], message)

    assert result.returncode == status
    assert fragment in result.stderr.decode()
    assert not (tmp_path / "spool" / "spool.db").exists() or stored_messages(tmp_path / "spool") == []


def test_unknown_local_user_names_fix(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "Root"], b"disk full\n")

    assert result.returncode == EX_NOUSER
    error = result.stderr.decode()
    assert "unknown local user 'Root@example.test'" in error
    assert f"create its Maildir folder {tmp_path / 'mail' / 'root'}" in error
    assert 'add an alias such as "root: alice" in the local.aliases file' in error


def test_exit_code_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[policy]\nmax_recipients = \"many\"\n")

    result = sendmail(["--config", str(config), "alice"], b"x\n")

    assert result.returncode == EX_CONFIG
    assert f"{config}:policy.max_recipients:" in result.stderr.decode()


def test_exit_code_tempfail_when_spool_unusable(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    # A regular file where the spool directory should be: the spool cannot open.
    (tmp_path / "spool").write_text("not a directory")

    result = sendmail(["--config", str(config), "alice"], b"Subject: x\n\nhi\n")

    assert result.returncode == EX_TEMPFAIL
    assert "try again later" in result.stderr.decode()


@pytest.mark.skipif(Path("/etc/relay/relay.toml").exists(), reason="this host has a system-wide relay config")
def test_defaults_never_create_spool(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "RELAY_CONFIG"}
    env["PYTHONPATH"] = str(REPO_ROOT)

    # A local recipient too: the default ./mail is as much a guess as the spool.
    for recipient in ("alice@example.test", "root"):
        command = [sys.executable, "-m", "relay", "sendmail", recipient]
        result = subprocess.run(
            command, input=b"Subject: x\n\nhi\n", capture_output=True, env=env, cwd=tmp_path, check=False, timeout=60
        )

        assert result.returncode == EX_TEMPFAIL, result.stderr.decode()
        assert f"no spool in {tmp_path / 'relay-spool'}" in result.stderr.decode()
        assert not (tmp_path / "relay-spool").exists()


@pytest.mark.skipif(Path("/etc/relay/relay.toml").exists(), reason="this host has a system-wide relay config")
def test_defaults_missing_spool_message(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "RELAY_CONFIG"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    command = [sys.executable, "-m", "relay", "sendmail", "root"]

    result = subprocess.run(
        command, input=b"Subject: x\n\nhi\n", capture_output=True, env=env, cwd=tmp_path, check=False, timeout=60
    )
    stderr = result.stderr.decode()

    assert result.returncode == EX_TEMPFAIL
    # One cause and one next step: the spool is missing, so write access is not the fix.
    assert stderr.count("\n") == 1
    assert "--config or RELAY_CONFIG" in stderr
    assert "write access" not in stderr
    assert "try again later" not in stderr


def test_unwritable_spool_is_tempfail() -> None:
    # Under /tmp, which every user can search, so that the child reaches the config.
    base = Path(tempfile.mkdtemp(prefix="relay-sendmail-"))
    try:
        base.chmod(0o755)
        assert _inject_without_owner_rights(base) == EX_TEMPFAIL
    finally:
        if (base / "spool").exists():
            (base / "spool").chmod(0o700)
        shutil.rmtree(base)


def _inject_without_owner_rights(base: Path) -> int:
    """Run sendmail into a 0700 spool from a child without the owner's rights; return its exit status."""
    config = write_config(base)
    SpoolStore(base / "spool").close()
    (base / "spool").chmod(0o700)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child with only the rights the spool's mode grants others
        status = -1
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            else:
                (base / "spool").chmod(0)
            options = parse_options(["--config", str(config), "someone@remote.test"])
            status = inject(options, io.BytesIO(b"Subject: x\n\nhi\n"), io.StringIO())
        finally:
            os.write(write_end, str(status).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        status = int(pipe.read())
    os.waitpid(pid, 0)
    return status


def test_config_from_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RELAY_CONFIG": str(config)}
    command = [sys.executable, "-m", "relay", "sendmail", "alice"]

    result = subprocess.run(
        command, input=b"Subject: x\n\nhi\n", capture_output=True, env=env, cwd=workdir, check=False, timeout=60
    )

    assert result.returncode == 0, result.stderr.decode()
    assert len(stored_messages(tmp_path / "spool")) == 1
    assert not (workdir / "relay-spool").exists()


def test_exit_code_noinput_when_stdin_closed(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    result = subprocess.run(
        ["sh", "-c", f'exec 0<&- "{sys.executable}" -m relay sendmail --config "{config}" alice'],
        capture_output=True,
        env=env,
        check=False,
        timeout=60,
    )

    assert result.returncode == EX_NOINPUT
    assert b"standard input is closed" in result.stderr


def test_parse_options_attached_values() -> None:
    options = parse_options(["-fsender@example.test", "-FName", "-t", "-oi", "-oem", "rcpt@example.net"])

    assert options.sender == "sender@example.test"
    assert options.full_name == "Name"
    assert options.extract_recipients
    assert options.ignore_dots
    assert options.recipients == ["rcpt@example.net"]


@pytest.mark.parametrize(
    ("args", "extract", "ignore_dots", "sender", "recipients"),
    [
        (["-ti"], True, True, None, []),
        (["-it"], True, True, None, []),
        (["-tif", "s@example.test", "rcpt"], True, True, "s@example.test", ["rcpt"]),
        (["-tfs@example.test", "rcpt"], True, False, "s@example.test", ["rcpt"]),
        # A value letter takes the rest of its group: -o with the value "i".
        (["-toi", "rcpt"], True, True, None, ["rcpt"]),
        (["-tbm", "-Uv", "rcpt"], True, False, None, ["rcpt"]),
        (["-o", "i", "rcpt"], False, True, None, ["rcpt"]),
    ],
)
def test_parse_options_grouped_flags(
    args: list[str], extract: bool, ignore_dots: bool, sender: str | None, recipients: list[str]
) -> None:
    options = parse_options(args)

    assert options.extract_recipients is extract
    assert options.ignore_dots is ignore_dots
    assert options.sender == sender
    assert options.recipients == recipients


@pytest.mark.parametrize("options", [["-Am"], ["-Ac"], ["-A", "m"], ["-tAm"]])
def test_sendmail_a_option_ignored(tmp_path: Path, options: list[str]) -> None:
    # Sendmail's -Am and -Ac pick its config file, and Postfix's sendmail ignores them.
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), *options, "alice"], b"To: alice\nSubject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    [(message, _)] = stored_messages(tmp_path / "spool")
    assert [recipient.address for recipient in message.recipients] == ["alice@example.test"]


@pytest.mark.parametrize("mode", ["-bh", "-bH"])
def test_sendmail_host_status_modes_ignored(tmp_path: Path, mode: str) -> None:
    # Sendmail's host status database: Postfix has none, and its sendmail exits at once.
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), mode], b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert result.stderr == b""
    assert not (tmp_path / "spool" / "spool.db").exists()


def test_sendmail_host_status_no_recipient(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-bh", "alice"], b"Subject: x\n\nhi\n")

    assert result.returncode == EX_USAGE
    assert "-bh reads no message, so it takes no recipient" in result.stderr.decode()
    assert not (tmp_path / "spool" / "spool.db").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-tx", "rcpt"], "unknown option -x in -tx"),
        (["-tbv"], "mode -bv is not supported"),
        (["-tf"], "option -f needs a value"),
        (["--verbose"], "unknown option --verbose"),
    ],
)
def test_parse_options_grouped_errors(args: list[str], fragment: str) -> None:
    with pytest.raises(SendmailError) as caught:
        parse_options(args)

    assert caught.value.status == EX_USAGE
    assert fragment in str(caught.value)


def test_grouped_ti_queues_with_dots_kept(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    message = b"To: alice@example.test\nSubject: x\n\nbefore\n.\nafter\n"

    result = sendmail(["--config", str(config), "-ti"], message)

    assert result.returncode == 0, result.stderr
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == ["alice@example.test"]
    assert body.endswith(b"\r\nbefore\r\n.\r\nafter\r\n")


@pytest.mark.parametrize(
    ("args", "message", "body_type"),
    [
        # cron's command line, with a UTF-8 body (a command's output in a UTF-8 locale).
        (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-oi", "-t"], "To: alice\n\nVérifié\n".encode(), "8BITMIME"),
        # PHP mail() gives no -B; the 8-bit octets decide.
        (["-t", "-i"], "To: alice\nSubject: Grüße\n\nok\n".encode(), "8BITMIME"),
        (["-B", "7bit", "alice"], "Subject: x\n\n\xe9t\xe9\n".encode("latin-1"), "8BITMIME"),
        (["-B7BIT", "alice"], b"Subject: x\n\nplain\n", "7BIT"),
        (["-B8BITMIME", "alice"], b"Subject: x\n\nplain\n", "8BITMIME"),
        (["alice"], b"Subject: x\n\nplain\n", None),
    ],
)
def test_body_type_stored(tmp_path: Path, args: list[str], message: bytes, body_type: str | None) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), *args], message)

    assert result.returncode == 0, result.stderr
    [(stored, _)] = stored_messages(tmp_path / "spool")
    assert stored.envelope.body_type == body_type


def test_body_type_rejects_bad_value(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-B", "BINARYMIME", "alice"], b"Subject: x\n\nplain\n")

    assert result.returncode == EX_USAGE
    assert "invalid -B value 'BINARYMIME'; expected 7BIT or 8BITMIME" in result.stderr.decode()


def test_dsn_options_stored_with_message(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    dsn = ["-N", "Success, delay", "-R", "full", "-V", "batch 7+1"]
    args = ["--config", str(config), *dsn, "alice", "bob@remote.test"]

    result = sendmail(args, b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    [(stored, _)] = stored_messages(tmp_path / "spool")
    assert [r.notify for r in stored.recipients] == [("SUCCESS", "DELAY"), ("SUCCESS", "DELAY")]
    assert stored.envelope.ret == "FULL"
    # Stored in xtext form, as the SMTP server stores ENVID.
    assert stored.envelope.envid == "batch+207+2B1"


def test_dsn_never_and_defaults_stored(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    never = sendmail(["--config", str(config), "-Nnever", "-Rhdrs", "alice"], b"Subject: x\n\nhi\n")
    default = sendmail(["--config", str(config), "alice"], b"Subject: x\n\nhi\n")

    assert never.returncode == 0, never.stderr
    assert default.returncode == 0, default.stderr
    stored = sorted((message for message, _ in stored_messages(tmp_path / "spool")), key=lambda m: m.arrival)
    assert [r.notify for r in stored[0].recipients] == [("NEVER",)]
    assert stored[0].envelope.ret == "HDRS"
    assert stored[0].envelope.envid is None
    assert [r.notify for r in stored[1].recipients] == [()]
    assert stored[1].envelope.ret is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-N", "never,success", "alice"], "invalid -N value 'never,success'; expected never, or a comma-separated"),
        (["-N", "sometimes", "alice"], "invalid -N value 'sometimes'"),
        (["-N", "failure,", "alice"], "invalid -N value 'failure,'"),
        (["-N", "", "alice"], "invalid -N value ''"),
        (["-R", "body", "alice"], "invalid -R value 'body'; expected hdrs or full"),
        (["-V", "a\x01b", "alice"], "invalid -V value 'a\\x01b'; expected an envelope ID of printable ASCII"),
        (["-V", "\u00e9t\u00e9", "alice"], "invalid -V value"),
        (["-V", "x" * 101, "alice"], "longer than 100 characters once encoded as xtext"),
        # Each "+" takes three characters in xtext: 40 of them are 120.
        (["-V", "+" * 40, "alice"], "longer than 100 characters once encoded as xtext"),
        (["alice", "-N"], "option -N needs a value"),
    ],
)
def test_dsn_options_reject_bad_values(tmp_path: Path, args: list[str], fragment: str) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), *args], b"Subject: x\n\nhi\n")

    assert result.returncode == EX_USAGE
    assert fragment in result.stderr.decode()
    assert not (tmp_path / "spool" / "spool.db").exists()


def test_parse_options_rejects_unknown_mode() -> None:
    with pytest.raises(SendmailError) as caught:
        parse_options(["-bv", "x"])

    assert caught.value.status == EX_USAGE


def test_internal_error_gives_ex_software(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A bug anywhere below run() must reach the caller as EX_SOFTWARE and one
    # line on stderr, never a traceback; a failing inject() stands in for it.
    def broken_inject(*args: object) -> int:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(sendmail_module, "inject", broken_inject)

    status = sendmail_module.run(["alice@example.test"])

    assert status == EX_SOFTWARE
    assert capsys.readouterr().err == "sendmail: internal error: RuntimeError: simulated bug\n"


def test_extract_recipients_reports_bad_fields(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    malformed = sendmail(["--config", str(config), "-t"], b"To: @@@\nSubject: x\n\nhi\n")
    empty = sendmail(["--config", str(config), "-t"], b"To: undisclosed-recipients:;\nSubject: x\n\nhi\n")
    non_ascii = sendmail(["--config", str(config), "-t"], "To: jös@example.test\nSubject: x\n\nhi\n".encode())

    assert malformed.returncode == EX_NOUSER
    assert "invalid recipient address '@@@' in the To field" in malformed.stderr.decode()
    assert empty.returncode == EX_USAGE
    assert "the To, Cc and Bcc fields hold no valid address" in empty.stderr.decode()
    # The header's UTF-8 (RFC 6532) shows as such in the error.
    assert non_ascii.returncode == EX_NOUSER
    assert "unknown local user 'jös@example.test'" in non_ascii.stderr.decode()


def test_extract_recipients_rejects_invalid_utf8(tmp_path: Path) -> None:
    # Latin-1 in To: is not UTF-8; the address is rejected, not queued with U+FFFD.
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-t"], b"To: j\xf6rg@remote.test\nSubject: x\n\nhi\n")

    assert result.returncode == EX_NOUSER
    assert "invalid recipient address" in result.stderr.decode()
    assert not (tmp_path / "spool" / "spool.db").exists() or stored_messages(tmp_path / "spool") == []


def _queue_deferred(tmp_path: Path, recipients: list[str]) -> str:
    """Queue a message through sendmail, then defer each recipient for an hour; return its queue ID."""
    config = write_config(tmp_path)
    assert sendmail(["--config", str(config), *recipients], b"Subject: x\n\nhi\n").returncode == 0
    [(stored, _)] = stored_messages(tmp_path / "spool")
    spool = Spool.open(tmp_path / "spool")
    try:
        results = [
            DeliveryResult(stored.queue_id, index, Outcome.DEFERRED, "451 4.3.0 later", "mx.example.test",
                           time.time() + 3600)
            for index in range(len(recipients))
        ]
        asyncio.run(spool.record_results(results))
    finally:
        spool.close()
    return stored.queue_id


def _due(tmp_path: Path) -> dict[str, bool]:
    [(stored, _)] = stored_messages(tmp_path / "spool")
    return {recipient.address: recipient.next_attempt <= time.time() for recipient in stored.recipients}


@pytest.mark.parametrize(
    ("option", "due"),
    [
        (["-q"], {"carol@one.test": True, "dave@two.test": True}),
        (["-qRtwo.test"], {"carol@one.test": False, "dave@two.test": True}),
        (["-qI{queue_id}"], {"carol@one.test": True, "dave@two.test": True}),
    ],
)
def test_q_flushes_deferred_mail(
    tmp_path: Path, option: list[str], due: dict[str, bool]
) -> None:
    # As with Postfix's sendmail -q (run from cron): no message is read and nothing is printed.
    queue_id = _queue_deferred(tmp_path, ["carol@one.test", "dave@two.test"])
    assert _due(tmp_path) == {"carol@one.test": False, "dave@two.test": False}
    config = tmp_path / "relay.toml"

    result = sendmail(["--config", str(config), *[arg.format(queue_id=queue_id) for arg in option]], b"")

    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert _due(tmp_path) == due
    assert len(stored_messages(tmp_path / "spool")) == 1


def test_q_interval_is_ignored(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-q30m"], b"Subject: x\n\nhi\n")

    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert not (tmp_path / "spool" / "spool.db").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-q", "alice"], "takes no recipient and no -t"),
        (["-q", "-t"], "takes no recipient and no -t"),
        (["-qR"], "-qR needs its value in the same argument"),
        (["-qS", "one.test"], "-qS is not supported"),
        (["-qRone two"], "-qR 'one two' contains a space"),
        (["-qIbad"], "invalid queue ID 'bad'"),
    ],
)
def test_q_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    _queue_deferred(tmp_path, ["carol@one.test"])
    config = tmp_path / "relay.toml"

    result = sendmail(["--config", str(config), *args], b"")

    assert result.returncode == EX_USAGE
    assert message in result.stderr.decode()
    assert _due(tmp_path) == {"carol@one.test": False}


def test_q_unknown_queue_id(tmp_path: Path) -> None:
    _queue_deferred(tmp_path, ["carol@one.test"])
    config = tmp_path / "relay.toml"

    result = sendmail(["--config", str(config), "-qI0123456789ABCDE"], b"")

    assert result.returncode == EX_NOINPUT
    assert "queue ID 0123456789ABCDE not found" in result.stderr.decode()


def test_interrupt_while_reading_exits_quietly(tmp_path: Path) -> None:
    # Ctrl-C while a user types a message ends sendmail with status 130 and
    # one line, not a traceback, and nothing is queued.
    config = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "relay", "sendmail", "--config", str(config), "alice"]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # A test run started as a shell's background job inherits SIGINT
        # ignored, and sendmail keeps an ignored SIGINT, so restore the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdin is not None
        process.stdin.write(b"Subject: half typed\n")
        process.stdin.flush()
        # Wait until it blocks in read(2) on standard input (syscall 0 on
        # x86-64, 63 on arm64), so the signal lands in the message reading.
        deadline = time.monotonic() + 20
        syscall = Path(f"/proc/{process.pid}/syscall")
        while time.monotonic() < deadline:
            fields = syscall.read_text().split()
            if fields and fields[0] in ("0", "63") and fields[1] == "0x0":
                break
            time.sleep(0.02)
        else:
            pytest.fail("sendmail never waited for standard input")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130
    assert b"Traceback" not in stderr
    assert stderr.decode().strip() == "sendmail: interrupted"
    assert not (tmp_path / "spool").exists() or stored_messages(tmp_path / "spool") == []


def test_import_skips_scheduler_and_dns() -> None:
    # sendmail runs once per message an application hands over, so its start
    # must not load the scheduler, the SMTP client or dnspython.
    code = (
        "import sys, relay.sendmail\n"
        "print(sorted(m for m in ('relay.delivery.scheduler', 'dns') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    assert result.stdout.strip() == "[]"


def test_local_submission_picked_up_once(tmp_path: Path) -> None:
    # Three recipients claimed one at a time, then again by a scheduler that
    # took over the spool: only the first claim is the message's pickup.
    config = write_config(tmp_path)
    args = ["--config", str(config), "-f", "alice", "a@remote.test", "b@remote.test", "c@remote.test"]
    assert sendmail(args, b"Subject: x\n\nhi\n").returncode == 0
    [(stored, _)] = stored_messages(tmp_path / "spool")
    assert stored.envelope.local_submission
    assert not stored.picked_up

    async def claims() -> list[list[tuple[str, bool]]]:
        spool = Spool.open(tmp_path / "spool")
        try:
            rounds = []
            for owner in ("first", "first", "first", "second"):
                if owner == "second":
                    assert await spool.release_leases("first") == 3
                claimed = await spool.claim(owner, limit=1 if owner == "first" else 10)
                rounds.append([(claim.queue_id, claim.picked_up) for claim in claimed])
            return rounds
        finally:
            spool.close()

    first, second, third, after_restart = asyncio.run(claims())

    assert first == [(stored.queue_id, True)]
    assert second == [(stored.queue_id, False)]
    assert third == [(stored.queue_id, False)]
    assert after_restart == [(stored.queue_id, False)]
    [(marked, _)] = stored_messages(tmp_path / "spool")
    assert marked.picked_up
    assert marked.envelope.local_submission


def test_smtp_mail_never_picked_up(tmp_path: Path) -> None:
    # Mail with no client address and a protocol, as relay sendmail stored it
    # before the local_submission mark, is not a pickup either.
    envelopes = [
        Envelope(sender="a@example.test", recipients=(Recipient("b@remote.test"),), client_address="192.0.2.1",
                 protocol="ESMTP"),
        Envelope(sender="a@example.test", recipients=(Recipient("b@remote.test"),), protocol="local"),
    ]

    async def claims() -> list[bool]:
        spool = Spool.open(tmp_path / "spool")
        try:
            for envelope in envelopes:
                await spool.commit(envelope, b"Subject: x\r\n\r\nhi\r\n")
            return [claim.picked_up for claim in await spool.claim("scheduler")]
        finally:
            spool.close()

    assert asyncio.run(claims()) == [False, False]


def test_rejected_recipient_dsn_names_original(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    args = ["--config", str(config), "-f", "alice", "a@remote.test", "ghost"]

    result = sendmail(args, b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    original, dsn = [message for message, _ in stored_messages(tmp_path / "spool")]
    assert dsn.envelope.sender == ""
    assert dsn.envelope.original_queue_id == original.queue_id
    assert dsn.envelope.local_submission
    assert original.envelope.original_queue_id is None
