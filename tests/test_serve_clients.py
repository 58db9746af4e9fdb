"""Real SMTP clients against ``relay serve`` on loopback, under both event loops.

smtplib (plain, STARTTLS, AUTH PLAIN and LOGIN, SMTPUTF8, 8BITMIME, many
recipients), aiosmtplib, swaks (its exit code names the step that failed),
curl and Postfix's smtp-source; the corpus messages must be spooled byte for
byte after the Received header.  Ends with ``relay passwd`` and graceful
shutdown with transactions in flight.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pty
import re
import select
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from relay.smtp.auth import CredentialsError, CredentialStore, set_password
from tests.conftest import REPO_ROOT, require_corpus, require_peer
from tests.server_helpers import EVENT_LOOPS, Listener, RawClient, RelayProcess, make_certificate, strip_received


@pytest.fixture(scope="module", params=EVENT_LOOPS)
def relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    directory = tmp_path_factory.mktemp(f"clients-{request.param}")
    certificate = make_certificate(directory)
    passwords = directory / "passwd"
    set_password(str(passwords), "user", "pass")
    server = RelayProcess(
        directory,
        event_loop=request.param,
        listeners=[Listener(tls="starttls"), Listener(tls="implicit"), Listener(role="submission", tls="starttls")],
        certificate=certificate,
        password_file=passwords,
        server="max_connections_per_client = 200",
    )
    with server:
        yield server


def _context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _spooled_from(relay: RelayProcess, sender: str) -> list[bytes]:
    return [body for message, body in relay.spooled() if message.envelope.sender == sender]


def _message(sender: str, subject: str, body: str = "Hello.\n") -> EmailMessage:
    # Sent with send_message, or as_bytes with CRLF: smtplib passes bytes through
    # unchanged, and a bare LF in message data is refused by policy.
    message = EmailMessage()
    message["From"] = sender
    message["To"] = "rcpt@example.net"
    message["Subject"] = subject
    message.set_content(body)
    return message


def _crlf(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def test_smtplib_plain(relay: RelayProcess) -> None:
    sender = "smtplib-plain@example.com"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        refused = client.sendmail(sender, ["rcpt@example.net"], _crlf(_message(sender, "plain")))
        assert refused == {}
    [body] = _spooled_from(relay, sender)
    assert b"Subject: plain" in body


def test_smtplib_starttls_auth(relay: RelayProcess) -> None:
    for mechanism in ("PLAIN", "LOGIN"):
        sender = f"smtplib-auth-{mechanism.lower()}@example.com"
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.starttls(context=_context())
            client.ehlo()
            assert client.has_extn("auth")
            client.user, client.password = "user", "pass"
            code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            assert code == 235
            client.sendmail(sender, ["someone@example.org"], _crlf(_message(sender, mechanism)))
        [body] = _spooled_from(relay, sender)
        assert re.search(rb"with ESMTPSA id ", body)


def test_smtplib_bad_password(relay: RelayProcess) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", relay.listeners[1].port, timeout=10, context=_context()) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            client.login("user", "wrong")
        assert failure.value.smtp_code == 535


def test_smtplib_implicit_tls(relay: RelayProcess) -> None:
    sender = "smtplib-implicit@example.com"
    with smtplib.SMTP_SSL("127.0.0.1", relay.listeners[1].port, timeout=10, context=_context()) as client:
        client.login("user", "pass")
        client.sendmail(sender, ["rcpt@example.net"], _crlf(_message(sender, "implicit")))
    [body] = _spooled_from(relay, sender)
    assert b"with ESMTPSA id" in body


def test_smtplib_smtputf8_and_8bitmime(relay: RelayProcess) -> None:
    sender = "sénder@example.com"
    text = "Grüße aus Köln.\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        message = _message(sender, "utf8", text)
        data = message.as_bytes(policy=message.policy.clone(linesep="\r\n", utf8=True))
        client.sendmail(sender, ["rcpt@example.net"], data, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    [(stored, body)] = [m for m in relay.spooled() if m[0].envelope.sender == sender]
    assert stored.envelope.smtputf8
    assert stored.envelope.body_type == "8BITMIME"
    assert b"with UTF8SMTP id" in body


def test_smtplib_many_recipients(relay: RelayProcess) -> None:
    sender = "many@example.com"
    recipients = [f"user{i}@example.org" for i in range(300)]
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        assert client.sendmail(sender, recipients, _crlf(_message(sender, "many"))) == {}
    [(stored, _)] = [m for m in relay.spooled() if m[0].envelope.sender == sender]
    assert [r.address for r in stored.recipients] == recipients


def test_submission_requires_auth_and_adds_headers(relay: RelayProcess) -> None:
    sender = "submit@example.com"
    port = relay.listeners[2].port
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=_context())
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(sender, ["x@example.org"], b"Subject: no auth\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 530
        client.login("user", "pass")
        client.sendmail(sender, ["x@example.org"], b"Subject: submitted\r\n\r\nx\r\n")
    [body] = _spooled_from(relay, sender)
    rest = strip_received(body)
    assert rest.startswith(b"Date: ")
    assert b"\r\nMessage-ID: <" in rest
    assert rest.endswith(b"Subject: submitted\r\n\r\nx\r\n")


def test_submission_keeps_date_with_space_before_colon(relay: RelayProcess) -> None:
    sender = "obsolete-fields@example.com"
    port = relay.listeners[2].port
    message = b"Date : Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID : <a@example.com>\r\nSubject: s\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=_context())
        client.login("user", "pass")
        client.sendmail(sender, ["x@example.org"], message)
    [body] = _spooled_from(relay, sender)
    assert strip_received(body) == message


def test_aiosmtplib(relay: RelayProcess) -> None:
    sender = "aiosmtplib@example.com"

    async def send() -> None:
        await aiosmtplib.send(
            _message(sender, "aio"),
            hostname="127.0.0.1",
            port=relay.port,
            start_tls=True,
            tls_context=_context(),
            username="user",
            password="pass",
            recipients=["rcpt@example.net", "x@example.org"],
        )

    asyncio.run(send())
    [(stored, _)] = [m for m in relay.spooled() if m[0].envelope.sender == sender]
    assert [r.address for r in stored.recipients] == ["rcpt@example.net", "x@example.org"]


def _swaks(relay: RelayProcess, *arguments: str) -> subprocess.CompletedProcess[str]:
    swaks = require_peer("swaks")
    command = [swaks, "--server", f"127.0.0.1:{relay.port}", "--helo", "swaks.example.com", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_swaks_pipelining_starttls_auth(relay: RelayProcess) -> None:
    sender = "swaks@example.com"
    result = _swaks(
        relay, "--from", sender, "--to", "x@example.org", "--pipeline", "--tls",
        "--auth", "PLAIN", "--auth-user", "user", "--auth-password", "pass",
    )
    assert result.returncode == 0, result.stdout
    assert len(_spooled_from(relay, sender)) == 1


def test_swaks_exit_codes(relay: RelayProcess) -> None:
    # swaks exit codes: 23 = error after RCPT, 28 = AUTH failed.
    denied = _swaks(relay, "--from", "a@example.com", "--to", "x@example.org", "--server",
                    f"127.0.0.1:{relay.listeners[2].port}", "--tls")
    assert denied.returncode == 23, denied.stdout
    bad_auth = _swaks(relay, "--from", "a@example.com", "--to", "rcpt@example.net", "--tls",
                      "--auth", "LOGIN", "--auth-user", "user", "--auth-password", "wrong")
    assert bad_auth.returncode == 28, bad_auth.stdout
    unknown = _swaks(relay, "--from", "a@example.com", "--to", "nosuchuser@example.net")
    assert unknown.returncode == 24, unknown.stdout


def test_curl(relay: RelayProcess, tmp_path: Path) -> None:
    curl = require_peer("curl")
    sender = "curl@example.com"
    message = tmp_path / "message.txt"
    message.write_bytes(b"Subject: curl\r\n\r\nsent by curl\r\n")
    result = subprocess.run(
        [curl, "--silent", "--show-error", f"smtp://127.0.0.1:{relay.port}", "--mail-from", sender,
         "--mail-rcpt", "rcpt@example.net", "--upload-file", str(message)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    [body] = _spooled_from(relay, sender)
    assert strip_received(body) == b"Subject: curl\r\n\r\nsent by curl\r\n"


def test_corpus_spooled_byte_for_byte(relay: RelayProcess) -> None:
    corpus = require_corpus("cpython-email")
    files = sorted(corpus.glob("msg_*.txt"))
    assert len(files) == 48
    expected = {}
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        for path in files:
            sender = f"corpus-{path.stem}@example.com"
            raw = path.read_bytes()
            # A client converts every line end to CRLF (smtplib does so only for str
            # messages) and dot-stuffs; the relay must store exactly that CRLF form.
            crlf = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
            if not crlf.endswith(b"\r\n"):
                crlf += b"\r\n"
            expected[sender] = crlf
            client.sendmail(sender, ["rcpt@example.net"], crlf)
    stored = {m.envelope.sender: body for m, body in relay.spooled() if m.envelope.sender in expected}
    assert sorted(stored) == sorted(expected)
    for sender, body in stored.items():
        assert strip_received(body) == expected[sender], sender


def test_smtp_source_nothing_lost(relay: RelayProcess) -> None:
    smtp_source = require_peer("smtp-source")
    before = len(relay.spooled())
    result = subprocess.run(
        [smtp_source, "-s", "20", "-m", "2000", "-l", "1024", "-f", "source@example.com",
         "-t", "rcpt@example.net", f"127.0.0.1:{relay.port}"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert len(relay.spooled()) - before == 2000


def test_passwd_command(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    command = [sys.executable, "-m", "relay", "passwd", str(path), "alice"]
    environment = {"PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.run(command, input="secret\n", capture_output=True, text=True, env=environment)
    assert first.returncode == 0, first.stderr
    assert "added alice" in first.stdout
    second = subprocess.run(command, input="changed\n", capture_output=True, text=True, env=environment)
    assert "changed alice" in second.stdout
    assert path.stat().st_mode & 0o777 == 0o600
    store = CredentialStore(str(path))
    assert store.verify("alice", "changed")
    assert not store.verify("alice", "secret")
    assert not store.verify("bob", "changed")
    assert "changed" not in path.read_text()


def test_passwd_checks_name_before_prompt(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    command = [sys.executable, "-m", "relay", "passwd", str(path), "a:b"]

    result = subprocess.run(
        command, input="", capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)}, timeout=60
    )

    # An empty stdin would give "empty password"; the name is checked first.
    assert result.returncode == 1
    assert "invalid user name 'a:b'" in result.stderr
    assert not path.exists()


def test_passwd_keeps_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    command = [sys.executable, "-m", "relay", "passwd", str(path), "alice"]
    environment = {"PYTHONPATH": str(REPO_ROOT)}
    assert subprocess.run(command, input=b"secret\n", capture_output=True, env=environment, timeout=60).returncode == 0
    # An operator lets the relay's group read the file.
    path.chmod(0o640)

    result = subprocess.run(command, input="changed\n", capture_output=True, text=True, env=environment, timeout=60)

    assert result.returncode == 0, result.stderr
    assert path.stat().st_mode & 0o777 == 0o640
    assert CredentialStore(str(path)).verify("alice", "changed")


def test_passwd_through_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    target = tmp_path / "secrets" / "passwd"
    set_password(str(target), "alice", "secret")
    link = tmp_path / "passwd"
    link.symlink_to(target)
    command = [sys.executable, "-m", "relay", "passwd", str(link), "bob"]

    result = subprocess.run(
        command, input="other\n", capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)}, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert link.is_symlink()
    assert link.resolve() == target
    store = CredentialStore(str(target))
    assert store.verify("alice", "secret")
    assert store.verify("bob", "other")
    assert sorted(entry.name for entry in target.parent.iterdir()) == ["passwd"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_passwd_as_root_keeps_owner(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    command = [sys.executable, "-m", "relay", "passwd", str(path), "alice"]
    environment = {"PYTHONPATH": str(REPO_ROOT)}
    assert subprocess.run(command, input=b"secret\n", capture_output=True, env=environment, timeout=60).returncode == 0
    # The file belongs to the user the relay runs as, here nobody (65534).
    os.chown(path, 65534, 65534)

    result = subprocess.run(command, input="changed\n", capture_output=True, text=True, env=environment, timeout=60)

    assert result.returncode == 0, result.stderr
    status = path.stat()
    assert status.st_uid == 65534
    assert status.st_gid == 65534
    assert status.st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the file to another owner needs root")
def test_passwd_cannot_keep_owner_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "passwd"
    set_password(str(path), "alice", "secret")
    os.chown(path, 65534, 65534)
    before = path.read_bytes()

    def chown_not_permitted(target: str, uid: int, gid: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", target)

    # What a user other than root and the owner gets from chown.
    monkeypatch.setattr(os, "chown", chown_not_permitted)
    with pytest.raises(CredentialsError) as caught:
        set_password(str(path), "alice", "changed")

    assert str(caught.value).startswith(f"{path}: cannot keep its owner 65534 and group 65534, so nothing changed")
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["passwd"]


@pytest.mark.parametrize("user", ["#alice", "a b", "a:b", ""])
def test_passwd_rejects_unstorable_name(tmp_path: Path, user: str) -> None:
    path = tmp_path / "passwd"
    command = [sys.executable, "-m", "relay", "passwd", str(path), user]

    result = subprocess.run(
        command, input="secret\n", capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)}, timeout=60
    )

    assert result.returncode == 1
    assert f"invalid user name {user!r}" in result.stderr
    assert not path.exists()


def test_passwd_non_utf8_file_named(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_bytes(b"bob:\xff\n")
    command = [sys.executable, "-m", "relay", "passwd", str(path), "alice"]

    result = subprocess.run(
        command, input="secret\n", capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)}, timeout=60
    )

    assert result.returncode == 1
    assert f"{path}: invalid UTF-8 at byte 4" in result.stderr
    assert path.read_bytes() == b"bob:\xff\n"


def test_serve_empty_spool_option_rejected(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "relay", "serve", "--spool", ""]

    result = subprocess.run(
        command, capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)}, cwd=tmp_path, timeout=60
    )

    assert result.returncode == 2
    assert "--spool is empty" in result.stderr
    assert not (tmp_path / "relay-spool").exists()


def test_passwd_eof_at_prompt(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    pid, terminal = pty.fork()
    if pid == 0:  # the child, whose controlling terminal is the pty
        os.environ["PYTHONPATH"] = str(REPO_ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "relay", "passwd", str(path), "alice"])
    output = b""
    deadline = time.monotonic() + 30
    while b"Password for alice" not in output and time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.5)[0]:
            output += os.read(terminal, 1024)
    os.write(terminal, b"\x04")  # Ctrl-D
    while time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.5)[0]:
            try:
                chunk = os.read(terminal, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(terminal)

    assert os.waitstatus_to_exitcode(status) == 1
    assert b"no password entered; nothing changed" in output
    assert b"Traceback" not in output
    assert not path.exists()


def test_graceful_shutdown_loses_nothing(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path, server='shutdown_grace = "10s"').start()
    try:
        acknowledged: list[str] = []
        in_data = []
        for index in range(5):
            raw = RawClient(relay.port)
            raw.exchange(b"", ["220"])
            raw.exchange(b"EHLO c.example.com\r\n", ["250"])
            raw.exchange(f"MAIL FROM:<shutdown{index}@example.com>\r\n".encode(), ["250"])
            raw.exchange(b"RCPT TO:<rcpt@example.net>\r\nDATA\r\n", ["250", "354"])
            raw.send(b"Subject: in flight\r\n\r\n")
            in_data.append(raw)
        idle = RawClient(relay.port)
        idle.exchange(b"", ["220"])
        relay.signal(signal.SIGTERM)
        assert idle.reply().startswith("421 4.3.2")

        def finish(raw: RawClient) -> None:
            raw.send(b"body\r\n.\r\n")
            reply = raw.reply()
            if reply.startswith("250"):
                acknowledged.append(reply.rsplit(" ", 1)[1])
            assert raw.reply().startswith("421 4.3.2")

        time.sleep(0.3)
        threads = [threading.Thread(target=finish, args=(raw,)) for raw in in_data]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert relay.stop(send_signal=False) == 0
        assert len(acknowledged) == 5
        stored = {message.queue_id for message, _ in relay.spooled()}
        assert set(acknowledged) <= stored
    finally:
        relay.kill()


def test_sink_listener_counts_and_discards(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path, listeners=[Listener(role="sink")]).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            for _ in range(3):
                client.sendmail("a@example.com", ["x@example.org", "y@example.org"], b"Subject: s\r\n\r\nx\r\n")
        assert relay.stop() == 0
    finally:
        relay.kill()
    assert re.search(r"sink_totals .*messages=3 recipients=6", relay.log()), relay.log()
    assert not relay.spool.exists()
