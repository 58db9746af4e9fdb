"""`relay sendmail` with the input that applications send: bad recipients, odd line ends, empty and long input.

Each test runs the real command as a subprocess and reads the real spool.
The comparisons with Postfix name what Postfix 3.7.11's sendmail did with
the same input in a private instance.
"""

from __future__ import annotations

import email
import time
from pathlib import Path

import pytest
from server_helpers import RelayProcess
from test_sendmail import sendmail, stored_messages, write_config

from relay.sendmail import EX_NOUSER, EX_USAGE
from relay.spool import DsnState, Envelope, Recipient, RecipientState, Spool, StoredMessage


def _only_message(spool: Path) -> tuple[StoredMessage, bytes]:
    messages = stored_messages(spool)
    assert len(messages) == 1, messages
    return messages[0]


def _original_and_dsns(spool: Path) -> tuple[StoredMessage, bytes, list[tuple[StoredMessage, bytes]]]:
    """Return the queued message and the DSNs queued with it, which have the null sender."""
    messages = stored_messages(spool)
    originals = [(message, body) for message, body in messages if message.envelope.sender]
    assert len(originals) == 1, messages
    dsns = [(message, body) for message, body in messages if not message.envelope.sender]
    return originals[0][0], originals[0][1], dsns


def _states(message: StoredMessage) -> dict[str, tuple[RecipientState, DsnState, str | None]]:
    return {r.address: (r.state, r.dsn, r.last_reply) for r in message.recipients}


def test_t_invalid_address_bounces_alone(tmp_path: Path) -> None:
    # Postfix queues such a message and bounces user@ with 5.1.3 "bad address syntax".
    config = write_config(tmp_path)
    message = b'To: alice@example.test, user@\nCc: "a b"@, bob\nBcc: carol@remote.test\nSubject: x\n\nhi\n'

    result = sendmail(["--config", str(config), "-t"], message)

    assert result.returncode == 0, result.stderr
    stored, body, dsns = _original_and_dsns(tmp_path / "spool")
    states = _states(stored)
    assert states["alice@example.test"] == (RecipientState.QUEUED, DsnState.NONE, None)
    assert states["carol@remote.test"] == (RecipientState.QUEUED, DsnState.NONE, None)
    syntax = (RecipientState.BOUNCED, DsnState.QUEUED, "501 5.1.3 Invalid recipient address syntax")
    assert states["user@"] == syntax
    assert states['"a b"@'] == syntax
    assert states["bob@example.test"] == (RecipientState.BOUNCED, DsnState.QUEUED, "550 5.1.1 No such user here")
    assert len(states) == 5
    assert b"\r\nSubject: x\r\n\r\nhi\r\n" in body
    # One DSN, already queued to the sender, reports the three.
    [(dsn, report)] = dsns
    assert [recipient.address for recipient in dsn.recipients] == [stored.envelope.sender]
    assert b"Final-Recipient: rfc822; user@\r\n" in report
    assert b'Final-Recipient: rfc822; "a b"@\r\n' in report
    assert b"Final-Recipient: rfc822; bob@example.test\r\n" in report
    assert report.count(b"Status: 5.1.3\r\n") == 2
    assert report.count(b"Status: 5.1.1\r\n") == 1
    assert b"alice@example.test" not in report.split(b"Content-Type: text/rfc822-headers")[0]
    error = result.stderr.decode()
    assert "invalid recipient address 'user@' in the To field" in error
    assert "invalid recipient address '\"a b\"@' in the Cc field" in error
    assert "unknown local user 'bob@example.test'" in error
    assert f"queued as {stored.queue_id} for the valid recipients" in error
    assert f"a DSN to {stored.envelope.sender} reports the 3 rejected recipients" in error


def test_argument_invalid_address_bounces_alone(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-f", "app@remote.test", "alice", "a b@example.net"], b"hi\n")

    assert result.returncode == 0, result.stderr
    stored, _, dsns = _original_and_dsns(tmp_path / "spool")
    assert _states(stored) == {
        "alice@example.test": (RecipientState.QUEUED, DsnState.NONE, None),
        "a b@example.net": (RecipientState.BOUNCED, DsnState.QUEUED, "501 5.1.3 Invalid recipient address syntax"),
    }
    assert [dsn.recipients[0].address for dsn, _ in dsns] == ["app@remote.test"]
    error = result.stderr.decode()
    assert "invalid recipient address 'a b@example.net' on the command line" in error
    assert "a DSN to app@remote.test reports the rejected recipient" in error


def test_rejected_without_dsn_on_stderr(tmp_path: Path) -> None:
    # The null sender and -N without failure get no DSN, so standard error is the only report.
    config = write_config(tmp_path)

    null_sender = sendmail(["--config", str(config), "-f", "<>", "alice", "user@"], b"hi\n")
    success_only = sendmail(["--config", str(config), "-N", "success", "alice", "user@"], b"hi\n")

    assert null_sender.returncode == 0
    assert "invalid recipient address 'user@' on the command line" in null_sender.stderr.decode()
    assert "no DSN reports the rejected recipient, because the sender is null" in null_sender.stderr.decode()
    assert success_only.returncode == 0
    assert "no DSN reports the rejected recipient, because -N does not include failure" in (
        success_only.stderr.decode()
    )
    messages = stored_messages(tmp_path / "spool")
    assert len(messages) == 2
    for stored, _ in messages:
        assert _states(stored)["user@"] == (
            RecipientState.BOUNCED, DsnState.NONE, "501 5.1.3 Invalid recipient address syntax"
        )
        assert _states(stored)["alice@example.test"][0] is RecipientState.QUEUED


def test_all_recipients_invalid_queues_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-t", "x y"], b"To: user@, @@@\nCc: nobody\nSubject: x\n\nhi\n")

    assert result.returncode == EX_NOUSER
    lines = result.stderr.decode().splitlines()
    assert lines[0] == "sendmail: invalid recipient address 'x y' on the command line"
    assert lines[1] == "sendmail: invalid recipient address 'user@' in the To field"
    assert lines[2] == "sendmail: invalid recipient address '@@@' in the To field"
    assert lines[3].startswith("sendmail: unknown local user 'nobody@example.test'")
    assert len(lines) == 4
    assert not (tmp_path / "spool" / "spool.db").exists() or stored_messages(tmp_path / "spool") == []


def test_rejected_address_stored_printable(tmp_path: Path) -> None:
    # A NUL or other control octet in a header address, and an endless one, reach the DSN only as text.
    config = write_config(tmp_path)
    long_address = "x" * 600 + "@"

    result = sendmail(["--config", str(config), "-t"], f"To: alice, a\0b@, {long_address}\n\nhi\n".encode())

    assert result.returncode == 0, result.stderr
    stored, _, dsns = _original_and_dsns(tmp_path / "spool")
    addresses = [recipient.address for recipient in stored.recipients]
    assert addresses[:2] == ["alice@example.test", "a?b@"]
    assert addresses[2] == "x" * 253 + "..."
    assert len(addresses) == 3
    [(_, report)] = dsns
    # The returned header of the original keeps its NUL; the report itself has none.
    assert b"\0" not in report.split(b"Content-Type: text/rfc822-headers")[0]
    assert b"Final-Recipient: rfc822; a?b@\r\n" in report


def test_rejected_recipient_dsn_reaches_sender(tmp_path: Path) -> None:
    # End to end: the valid recipient gets the message and the sender a DSN naming the bad address.
    relay = RelayProcess(tmp_path, deliver=True)
    with relay:
        result = sendmail(
            ["--config", str(relay.config_path), "-t", "-f", "rcpt@example.net"],
            b"To: rcpt@example.net, user@\nSubject: report\n\nhi\n",
        )
        assert result.returncode == 0, result.stderr
        inbox = tmp_path / "mail" / "rcpt" / "new"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(inbox.glob("*")) if inbox.exists() else []) < 2:
            time.sleep(0.1)
        messages = [path.read_bytes() for path in sorted(inbox.glob("*"))]
    dsns = [message for message in messages if b"multipart/report" in message]
    originals = [message for message in messages if b"Subject: report" in message and message not in dsns]
    assert len(dsns) == 1, messages
    assert len(originals) == 1, messages
    # Maildir files end their lines in LF.
    assert b"\nFinal-Recipient: rfc822; user@\n" in dsns[0]
    assert b"\nStatus: 5.1.3\n" in dsns[0]
    assert b"\nAction: failed\n" in dsns[0]


def test_commit_with_failures_rejects_bad_indexes(spool: Spool) -> None:
    envelope = Envelope(sender="a@example.test", recipients=(Recipient("b@example.test"), Recipient("c@")))

    with pytest.raises(ValueError, match="at least one recipient that has not failed"):
        spool.commit_with_failures_blocking(envelope, b"hi\r\n", {0: "501 5.1.3 x", 1: "501 5.1.3 x"})
    with pytest.raises(ValueError, match="out of range"):
        spool.commit_with_failures_blocking(envelope, b"hi\r\n", {2: "501 5.1.3 x"})


@pytest.mark.parametrize("line_end", [b"\r\r\n", b"\r\r\r\n"])
def test_cr_cr_lf_keeps_header_intact(tmp_path: Path, line_end: bytes) -> None:
    # Postfix's sendmail removes one CR before each LF, so the header stays a header.
    config = write_config(tmp_path)
    message = b"To: alice@example.test\nSubject: crcr\nX-Tag: 1\n\nline 1\nline 2\n".replace(b"\n", line_end)

    result = sendmail(["--config", str(config), "-t"], message)

    assert result.returncode == 0, result.stderr
    _, body = _only_message(tmp_path / "spool")
    assert b"\r\nTo: alice@example.test\r\nSubject: crcr\r\nX-Tag: 1\r\n\r\nline 1\r\nline 2\r\n" in body
    assert body.endswith(b"\r\nX-Tag: 1\r\n\r\nline 1\r\nline 2\r\n")
    assert b"\r\r" not in body


def test_cr_only_line_ends_become_crlf(tmp_path: Path) -> None:
    # Old Mac text: each CR is a line end, so the header and the empty line before the body stay.
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-t"], b"To: alice@example.test\rSubject: cr\r\rline 1\r\rline 3\r")

    assert result.returncode == 0, result.stderr
    _, body = _only_message(tmp_path / "spool")
    assert body.endswith(b"\r\nSubject: cr\r\n\r\nline 1\r\n\r\nline 3\r\n")


def test_empty_message_gets_header_fields(tmp_path: Path) -> None:
    # Postfix queues an empty message with its added Date, Message-ID and From.
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "alice"], b"")

    assert result.returncode == 0, result.stderr
    _, body = _only_message(tmp_path / "spool")
    assert b"\r\nDate: " in body
    assert b"\r\nMessage-ID: <" in body
    assert b"\r\nFrom: " in body


def test_empty_message_with_t_has_no_recipients(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-t"], b"")

    assert result.returncode == EX_USAGE
    assert "no recipients" in result.stderr.decode()


def test_long_header_line_and_nul_kept(tmp_path: Path) -> None:
    # relay stores the octets as given; the delivery client breaks lines over 998 octets, as Postfix's smtp does.
    config = write_config(tmp_path)
    long_value = b"a" * 1500
    message = b"Subject: long\nX-Long: " + long_value + b"\nTo: alice@example.test\n\nab\0cd\n"

    result = sendmail(["--config", str(config), "-t"], message)

    assert result.returncode == 0, result.stderr
    stored, body = _only_message(tmp_path / "spool")
    assert [recipient.address for recipient in stored.recipients] == ["alice@example.test"]
    assert b"\r\nX-Long: " + long_value + b"\r\nTo: alice@example.test\r\n\r\nab\0cd\r\n" in body


def test_rejected_report_escapes_sender(tmp_path: Path) -> None:
    # Printed as it is, the right-to-left override in this -f address would make
    # a terminal show the rest of the line reversed, ending in "exe.png".
    config = write_config(tmp_path)

    result = sendmail(["--config", str(config), "-f", "app\u202egnp.exe@remote.test", "alice", "user@"], b"hi\n")

    assert result.returncode == 0, result.stderr
    error = result.stderr.decode()
    assert "a DSN to app\\u202egnp.exe@remote.test reports the rejected recipient" in error
    assert "\u202e" not in error


def _text_part(report: bytes) -> bytes:
    """Return the plain-text part of a DSN, between the text/plain header and the delivery-status part."""
    return report.split(b"Content-Type: text/plain")[1].split(b"Content-Type: message/delivery-status")[0]


def test_dsn_text_escapes_recipient_formatting(tmp_path: Path) -> None:
    # The plain-text part shows each bad address with its line separator and
    # bidirectional override escaped.  The delivery-status part keeps the
    # address in the utf-8 address type, as utf-8-addr-xtext (RFC 6533 section 3).
    config = write_config(tmp_path)
    bad = ["us\u2028er@", "a\u202egnp.exe@"]

    result = sendmail(["--config", str(config), "-f", "app@remote.test", "alice", *bad], b"hi\n")

    assert result.returncode == 0, result.stderr
    _, _, dsns = _original_and_dsns(tmp_path / "spool")
    [(_, report)] = dsns
    text = _text_part(report).decode()
    assert "<us\\u2028er@>: failed: 501 5.1.3" in text
    assert "<a\\u202egnp.exe@>: failed: 501 5.1.3" in text
    assert "\u2028" not in text
    assert "\u202e" not in text
    status = report.split(b"Content-Type: message/delivery-status")[1].split(b"\r\n--")[0]
    assert status.isascii()
    assert b"Final-Recipient: utf-8; us\\x{2028}er@\r\n" in status
    assert b"Final-Recipient: utf-8; a\\x{202E}gnp.exe@\r\n" in status


def test_dsn_dates_use_local_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "-0000" means that the local time zone is unknown (RFC 5322 section 3.3).
    # The POSIX zone "XYZ-2" is two hours east of UTC, so the offset is +0200.
    config = write_config(tmp_path)
    monkeypatch.setenv("TZ", "XYZ-2")

    result = sendmail(["--config", str(config), "-f", "app@remote.test", "alice", "user@"], b"hi\n")

    assert result.returncode == 0, result.stderr
    _, _, dsns = _original_and_dsns(tmp_path / "spool")
    [(_, report)] = dsns
    dsn = email.message_from_bytes(report)
    assert dsn["Date"].endswith(" +0200"), dsn["Date"]
    status = report.split(b"Content-Type: message/delivery-status")[1].split(b"\r\n--")[0].decode()
    arrival = [line for line in status.splitlines() if line.startswith("Arrival-Date: ")]
    assert len(arrival) == 1, status
    assert arrival[0].endswith(" +0200"), arrival
    assert "-0000" not in report.decode("utf-8", "replace")
