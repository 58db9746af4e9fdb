"""``relay sendmail -bs``: SMTP dialogues piped into the command, checked against the replies and the spool."""

from __future__ import annotations

import os
import re
import resource
import select
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.sendmail_options import EX_CONFIG, EX_PROTOCOL, EX_TEMPFAIL, EX_USAGE
from relay.spool import SpoolStore, StoredMessage
from tests.conftest import REPO_ROOT

EHLO = b"EHLO client.example\r\n"


def write_config(tmp_path: Path, extra: str = "", max_message_size: int = 4096) -> Path:
    for user in ("alice", "bob"):
        (tmp_path / "mail" / user).mkdir(parents=True, exist_ok=True)
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[server]
hostname = "mx.example.test"
{extra}

[spool]
path = "spool"

[policy]
local_domains = ["example.test"]
max_message_size = {max_message_size}
max_recipients = 2

[local]
maildir_root = "mail"
"""
    )
    return config


def command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "relay", "sendmail", "--config", str(config), "-bs", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def run_bs(config: Path, dialogue: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        command(config, *args), input=dialogue, capture_output=True, env=environment(), check=False, timeout=60
    )


def reply_codes(output: bytes) -> list[str]:
    """Return the code and enhanced status code (when present) of each final reply line."""
    codes = []
    for line in output.decode().split("\r\n"):
        match = re.match(r"(\d{3}) (\d\.\d{1,3}\.\d{1,3})?", line)
        if match:
            codes.append(" ".join(part for part in match.groups() if part))
    return codes


def stored_messages(spool: Path) -> list[tuple[StoredMessage, bytes]]:
    if not (spool / "spool.db").exists():
        return []
    with SpoolStore(spool) as store:
        result = []
        for message in store.messages(store.queue_ids()):
            assert isinstance(message, StoredMessage)
            result.append((message, store.load_body(message.queue_id)))
        return result


def test_dialogue_stores_message(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    dialogue = (
        EHLO
        + b"MAIL FROM:<app@example.test>\r\n"
        + b"RCPT TO:<alice@example.test>\r\n"
        + b"DATA\r\n"
        + b"Subject: hi\r\n\r\n..leading dot\r\n.\r\n"
        + b"QUIT\r\n"
    )

    result = run_bs(config, dialogue)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"220 mx.example.test ESMTP")
    assert b"250-PIPELINING\r\n" in result.stdout
    assert b"250-CHUNKING\r\n" in result.stdout
    assert b"STARTTLS" not in result.stdout
    assert b"AUTH" not in result.stdout
    assert reply_codes(result.stdout) == ["220", "250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert b"queued as " + stored.queue_id.encode() in result.stdout
    assert stored.envelope.sender == "app@example.test"
    assert [r.address for r in stored.recipients] == ["alice@example.test"]
    assert stored.envelope.client_address is None
    assert stored.envelope.helo_name == "client.example"
    assert body.startswith(
        b"Received: from client.example\r\n\tby mx.example.test (relay, from userid %d) with ESMTP id %s\r\n"
        b"\tfor <alice@example.test>; " % (os.getuid(), stored.queue_id.encode())
    )
    assert b"\r\nDate: " in body
    assert b"\r\nMessage-ID: <" in body
    assert b"\r\nFrom: app@example.test\r\n" in body
    assert body.endswith(b"Subject: hi\r\n\r\n.leading dot\r\n")


def test_pipelined_transactions_rset_and_bdat(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    # One write: three transactions, an RSET that drops the second, and BDAT in two chunks.
    dialogue = (
        EHLO
        + b"MAIL FROM:<a@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        + b"Subject: one\r\nBcc: secret@example.test\r\n\r\nfirst\r\n.\r\n"
        + b"MAIL FROM:<b@example.test>\r\nRCPT TO:<alice@example.test>\r\nRSET\r\n"
        + b"MAIL FROM:<> BODY=8BITMIME\r\nRCPT TO:<bob@example.test> NOTIFY=NEVER\r\n"
        + b"BDAT 14\r\nSubject: two\r\n"
        + b"BDAT 9 LAST\r\n\r\nsec\xc3\xb6nd"
        + b"QUIT\r\n"
    )

    result = run_bs(config, dialogue)

    assert result.returncode == 0, result.stderr
    assert reply_codes(result.stdout) == [
        "220", "250",
        "250 2.1.0", "250 2.1.5", "354", "250 2.0.0",
        "250 2.1.0", "250 2.1.5", "250 2.0.0",
        "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0",
        "221 2.0.0",
    ]  # fmt: skip
    first, second = sorted(stored_messages(tmp_path / "spool"), key=lambda item: item[0].envelope.sender)
    assert first[0].envelope.sender == ""
    assert first[0].envelope.body_type == "8BITMIME"
    assert [(r.address, r.notify) for r in first[0].recipients] == [("bob@example.test", ("NEVER",))]
    # The last BDAT chunk has no final line end; it is stored with one, as relay sendmail stores it.
    assert first[1].endswith(b"Subject: two\r\n\r\nsec\xc3\xb6nd\r\n")
    # The null sender gets a From field that names the local user.
    assert re.search(rb"\r\nFrom: [^@\r\n]+@example\.test\r\n", first[1])
    assert second[0].envelope.sender == "a@example.test"
    assert b"Bcc" not in second[1]
    assert second[1].endswith(b"Subject: one\r\n\r\nfirst\r\n")


def test_replies_past_unsent_limit_all_written(tmp_path: Path) -> None:
    # 2000 HELP replies take about 240 KB, so the session holds commands back
    # at server.max_unsent_replies (64K) until their replies are written.
    config = write_config(tmp_path)
    result = run_bs(config, EHLO + b"HELP\r\n" * 2000 + b"QUIT\r\n")

    codes = reply_codes(result.stdout)
    assert result.returncode == 0, result.stderr
    assert codes.count("214 2.0.0") == 2000
    assert codes[-1] == "221 2.0.0"


def test_limits_from_config(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    dialogue = (
        EHLO
        + b"MAIL FROM:<a@example.test> SIZE=5000\r\n"
        + b"MAIL FROM:<a@example.test>\r\n"
        + b"RCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nRCPT TO:<x@example.net>\r\n"
        + b"RCPT TO:<nobody@example.test>\r\n"
        + b"DATA\r\n"
        + b"Subject: big\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n"
        + b"QUIT\r\n"
    )

    result = run_bs(config, dialogue)

    assert result.returncode == 0, result.stderr
    assert reply_codes(result.stdout) == [
        "220", "250", "552 5.3.4", "250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3", "550 5.1.1",
        "354", "552 5.3.4", "221 2.0.0",
    ]  # fmt: skip
    assert stored_messages(tmp_path / "spool") == []


def test_bare_lf_data_stored_with_crlf(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    dialogue = (
        b"EHLO client.example\nMAIL FROM:<a@example.test>\nRCPT TO:<alice@example.test>\nDATA\n"
        + b"Subject: lf\nX-Test: 1\n\nline\n.\r\n.\r\nQUIT\n"
    )

    result = run_bs(config, dialogue)

    assert result.returncode == 0, result.stderr
    assert reply_codes(result.stdout)[-2:] == ["250 2.0.0", "221 2.0.0"]
    [(_, body)] = stored_messages(tmp_path / "spool")
    # The LF-ended lines are stored with CRLF; the "." after a bare LF did not end the data.
    assert body.endswith(b"Subject: lf\r\nX-Test: 1\r\n\r\nline\r\n.\r\n")


def test_eof_between_transactions_exits_zero(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    dialogue = EHLO + b"MAIL FROM:<a@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: x\r\n\r\ny\r\n"
    dialogue += b".\r\n"

    result = run_bs(config, dialogue)

    assert result.returncode == 0, result.stderr
    assert reply_codes(result.stdout)[-1] == "250 2.0.0"
    assert len(stored_messages(tmp_path / "spool")) == 1


@pytest.mark.parametrize(
    "unfinished",
    [b"MAIL FROM:<a@example.test>\r\n", b"MAIL FROM:<a@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n"],
)
def test_eof_inside_transaction_queues_nothing(tmp_path: Path, unfinished: bytes) -> None:
    config = write_config(tmp_path)

    result = run_bs(config, EHLO + unfinished)

    assert result.returncode == EX_PROTOCOL
    assert "standard input ended inside the mail transaction from <a@example.test>" in result.stderr.decode()
    assert stored_messages(tmp_path / "spool") == []


def test_250_only_after_commit(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    process = subprocess.Popen(
        command(config), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment()
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(EHLO + b"MAIL FROM:<a@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        process.stdin.write(b"Subject: x\r\n\r\ny\r\n.\r\n")
        process.stdin.flush()
        output = b""
        deadline = time.monotonic() + 30
        while b"queued as" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 1)
            if ready:
                output += os.read(process.stdout.fileno(), 4096)
        assert b"250 2.0.0 Ok: queued as" in output
        # The session is still open, so the message was committed before its 250 was written.
        [(stored, _)] = stored_messages(tmp_path / "spool")
        assert stored.queue_id.encode() in output
        process.stdin.write(b"QUIT\r\n")
        process.stdin.close()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class _PipedSMTP(smtplib.SMTP):
    """smtplib talking to ``relay sendmail -bs`` over a socket pair instead of a TCP connection."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        super().__init__()

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.settimeout(30)
        with theirs:
            self.process = subprocess.Popen(
                command(self.config), stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, env=environment()
            )
        return ours


def test_smtplib_over_socket_pair(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    client = _PipedSMTP(config)
    try:
        code, _ = client.connect("localhost", 25)
        assert code == 220
        refused = client.sendmail(
            "app@example.test", ["alice@example.test", "nobody@example.test"], b"Subject: smtplib\r\n\r\n.x\r\n"
        )
        assert refused == {"nobody@example.test": (550, b"5.1.1 No such user here")}
        assert client.quit()[0] == 221
        assert client.process is not None
        assert client.process.wait(timeout=30) == 0
    finally:
        if client.process is not None and client.process.poll() is None:
            client.process.kill()
            client.process.wait()
    [(stored, body)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == ["alice@example.test"]
    assert body.endswith(b"Subject: smtplib\r\n\r\n.x\r\n")


def test_spool_unusable_greets_421(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "spool").write_text("not a directory")

    result = run_bs(config, EHLO + b"QUIT\r\n")

    assert result.returncode == EX_TEMPFAIL
    assert reply_codes(result.stdout) == ["421 4.3.0"]
    error = result.stderr.decode()
    assert error == (
        f"sendmail: cannot open spool {tmp_path / 'spool'}: it is not a directory;"
        " give a directory in --spool or [spool] path; try again later\n"
    )


def _limit_file_size() -> None:
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG like a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_commit_failure_is_452_and_tempfail(tmp_path: Path) -> None:
    config = write_config(tmp_path, max_message_size=8_000_000)
    small = b"MAIL FROM:<a@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: s\r\n\r\ny\r\n.\r\n"
    large = (
        b"MAIL FROM:<a@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: l\r\n\r\n"
        + (b"z" * 998 + b"\r\n") * 3000
        + b".\r\n"
    )

    result = subprocess.run(
        command(config),
        input=EHLO + large + small + b"QUIT\r\n",
        capture_output=True,
        env=environment(),
        check=False,
        timeout=60,
        preexec_fn=_limit_file_size,
    )

    assert result.returncode == EX_TEMPFAIL
    assert reply_codes(result.stdout) == [
        "220", "250", "250 2.1.0", "250 2.1.5", "354", "452 4.3.1",
        "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0",
    ]  # fmt: skip
    assert "the spool failed to store 1 message(s)" in result.stderr.decode()
    [(_, body)] = stored_messages(tmp_path / "spool")
    assert body.endswith(b"Subject: s\r\n\r\ny\r\n")


def test_command_timeout_closes(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra='command_timeout = "1s"')
    process = subprocess.Popen(
        command(config), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment()
    )
    try:
        # Standard input stays open and silent after EHLO.
        assert process.stdin is not None
        process.stdin.write(EHLO)
        process.stdin.flush()
        status = process.wait(timeout=30)
        assert process.stdout is not None and process.stderr is not None
        output = process.stdout.read()
        assert status == EX_TEMPFAIL
        assert reply_codes(output) == ["220", "250", "421 4.4.2"]
        error = process.stderr.read().decode()
        assert "timed out: the SMTP client sent no more input within server.command_timeout (1s)" in error
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_silent_client_timeout_says_nothing_sent(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra='command_timeout = "1s"')
    process = subprocess.Popen(
        command(config), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment()
    )
    try:
        # Standard input stays open and sends nothing at all.
        status = process.wait(timeout=30)
        assert process.stderr is not None
        assert status == EX_TEMPFAIL
        error = process.stderr.read().decode()
        assert "timed out: the SMTP client sent nothing within server.command_timeout (1s)" in error
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_too_many_errors_is_protocol_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra="max_errors = 2")

    result = run_bs(config, EHLO + b"FOO\r\nBAR\r\nQUIT\r\n")

    assert result.returncode == EX_PROTOCOL
    assert reply_codes(result.stdout)[-1] == "421 4.7.0"
    assert "the SMTP session was closed" in result.stderr.decode()


@pytest.mark.parametrize("args", [["alice@example.test"], ["-t"], ["-q"]])
def test_recipient_arguments_are_usage_error(tmp_path: Path, args: list[str]) -> None:
    config = write_config(tmp_path)

    result = run_bs(config, EHLO, *args)

    assert result.returncode == EX_USAGE
    assert "-bs reads the recipients from RCPT commands" in result.stderr.decode()
    assert result.stdout == b""


def test_invalid_config_greets_421(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[policy]\nmax_recipients = "many"\n')

    result = run_bs(config, EHLO + b"QUIT\r\n")

    assert result.returncode == EX_CONFIG
    assert reply_codes(result.stdout) == ["421 4.3.0"]
    assert f"{config}:policy.max_recipients:" in result.stderr.decode()


def test_longest_timeouts_accepted(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'command_timeout = "1000w"\ndata_timeout = "1000w"')

    result = run_bs(config, EHLO + b"QUIT\r\n")

    assert result.returncode == 0, result.stderr
    assert reply_codes(result.stdout) == ["220", "250", "221 2.0.0"]


def test_timeout_above_maximum_rejected(tmp_path: Path) -> None:
    # select() takes at most about 292 years (int64 nanoseconds), so a longer
    # command_timeout stopped the session with an internal error after the greeting.
    config = write_config(tmp_path, "command_timeout = 10000000000")

    result = run_bs(config, EHLO + b"QUIT\r\n")

    assert result.returncode == EX_CONFIG
    assert f"{config}:server.command_timeout: value 10000000000 is above the maximum 1000w" in result.stderr.decode()
    assert b"220" not in result.stdout
