"""Server-side TLS handshakes over real sockets: implicit TLS and STARTTLS.

On an implicit-TLS listener a failed handshake must leave one ``tls_failed``
line with the client and the reason, and no session: no ``connect`` line,
no connection slot.  After STARTTLS the failure is logged between the
session's ``connect`` and ``disconnect`` lines.  Each test connects from a
loopback address of its own, so that its lines can be distinguished from
those of other tests.  Every test runs under uvloop and under the standard
asyncio loop.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from tests.server_helpers import EVENT_LOOPS, Listener, RawClient, RelayProcess, make_certificate

EHLO = b"EHLO client.example.com\r\n"
# Only 127.0.0.2 is trusted, so the per-client connection limit applies to the test clients.
POLICY = 'trusted_networks = ["127.0.0.2/32"]'


def tls_relay(
    directory: Path, event_loop: str, *, tls: str = "implicit", server: str = "", tls_settings: str = ""
) -> RelayProcess:
    """Return a relay with one TLS listener of kind ``tls``, a new certificate, ``server`` and ``[tls]`` settings."""
    return RelayProcess(
        directory,
        event_loop=event_loop,
        listeners=[Listener(tls=tls)],
        policy=POLICY,
        server=server,
        certificate=make_certificate(directory),
        tls=tls_settings,
    )


@pytest.fixture(scope="module", params=EVENT_LOOPS)
def relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    directory = tmp_path_factory.mktemp(f"tls-{request.param}")
    with tls_relay(directory, request.param) as server:
        yield server


def client_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
        # Security level 0 lets OpenSSL 3 offer the old versions and their ciphers at all.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def read_to_close(raw: RawClient, timeout: float = 5.0) -> bytes:
    """Read until the server closes the connection; return what it sent, such as a TLS alert."""
    raw.sock.settimeout(timeout)
    received = b""
    try:
        while chunk := raw.sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def client_lines(relay: RelayProcess, client: str, event: str, timeout: float = 5.0) -> list[str]:
    """Wait for an ``event`` line about ``client``; return every line about that client."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in relay.log().splitlines() if f" client={client} " in line + " "]
        if any(f" {event} " in line for line in lines):
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} line for {client} within {timeout} s; log:\n{relay.log()}")
        time.sleep(0.05)


def event_names(lines: list[str]) -> list[str]:
    return [line.split(": ", 1)[1].split(" ", 1)[0] for line in lines]


def field(line: str, name: str) -> str:
    found = re.search(rf' {name}=("[^"]*"|\S+)', line)
    assert found is not None, f"no {name}= in {line!r}"
    return found.group(1).strip('"')


def check_failure(relay: RelayProcess, client: str, reason: str) -> None:
    lines = client_lines(relay, client, "tls_failed")
    failures = [line for line in lines if " tls_failed " in line]
    assert len(failures) == 1, lines
    failed = failures[0]
    # The session ID appears on no other line: the connection never became a session.
    session = field(failed, "session")
    assert [line for line in relay.log().splitlines() if f"session={session} " in line] == [failed]
    assert " warning " in failed
    assert field(failed, "listener") == f"127.0.0.1:{relay.port}"
    assert field(failed, "error") == reason


def tls_client(relay: RelayProcess, source: str) -> RawClient:
    raw = RawClient(relay.port, source=source)
    raw.sock = client_context().wrap_socket(raw.sock, server_hostname="localhost")
    return raw


def check_service(relay: RelayProcess, source: str) -> None:
    """Check that a TLS client from ``source`` still gets a session."""
    with tls_client(relay, source) as raw:
        raw.exchange(b"", ["220 mx.example.test"])
        raw.exchange(EHLO, ["250"])
        raw.exchange(b"QUIT\r\n", ["221"])


def test_plaintext_client_logged(relay: RelayProcess) -> None:
    with RawClient(relay.port, source="127.0.0.3") as raw:
        raw.send(EHLO)
        # A TLS alert record at most, never an SMTP reply in plaintext.
        assert not read_to_close(raw).startswith(b"2")
    check_failure(relay, "127.0.0.3", "not a TLS handshake, plaintext SMTP perhaps (WRONG_VERSION_NUMBER)")
    check_service(relay, "127.0.0.3")


@pytest.mark.skipif(not ssl.HAS_TLSv1_1, reason="this OpenSSL cannot offer TLS 1.1")
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_1_1_client_logged(relay: RelayProcess) -> None:
    with RawClient(relay.port, source="127.0.0.4") as raw, pytest.raises(ssl.SSLError):
        client_context(maximum=ssl.TLSVersion.TLSv1_1).wrap_socket(raw.sock, server_hostname="localhost")
    check_failure(
        relay, "127.0.0.4", "the client offers only TLS versions this listener does not accept (UNSUPPORTED_PROTOCOL)"
    )


def test_close_before_client_hello_logged(relay: RelayProcess) -> None:
    with socket.create_connection(("127.0.0.1", relay.port), source_address=("127.0.0.5", 0)):
        pass
    check_failure(relay, "127.0.0.5", "client closed the connection during the handshake")


def test_close_inside_client_hello_logged(relay: RelayProcess) -> None:
    """The first bytes of a TLS record announce a ClientHello that never arrives."""
    with RawClient(relay.port, source="127.0.0.6") as raw:
        raw.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    check_failure(relay, "127.0.0.6", "client closed the connection during the handshake")


def test_tls_client_served_and_logged(relay: RelayProcess) -> None:
    check_service(relay, "127.0.0.7")
    lines = client_lines(relay, "127.0.0.7", "disconnect")
    assert event_names(lines) == ["connect", "tls", "disconnect"], lines
    connect, tls, disconnect = lines
    assert field(connect, "tls") == "true"
    assert field(tls, "version") == "TLSv1.3"
    assert field(disconnect, "commands") == "ehlo=1 quit=1"


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_silent_client_times_out(tmp_path: Path, event_loop: str) -> None:
    """A client that sends nothing is dropped after tls_handshake_timeout, without taking a connection slot."""
    relay = tls_relay(tmp_path, event_loop, server='tls_handshake_timeout = "1s"\nmax_connections_per_client = 1')
    with relay:
        with RawClient(relay.port, source="127.0.0.3") as silent:
            started = time.monotonic()
            # Other clients are served meanwhile.
            check_service(relay, "127.0.0.5")
            assert read_to_close(silent) == b""
            assert 0.8 <= time.monotonic() - started < 5
        check_failure(relay, "127.0.0.3", "handshake timed out")
        # Once the handshake gave up, the client's slot is free again.
        check_service(relay, "127.0.0.3")


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_stalled_handshakes_count_against_limit(tmp_path: Path, event_loop: str) -> None:
    """Connections whose handshake is still running are limited by the per-client connection limit."""
    relay = tls_relay(tmp_path, event_loop, server='tls_handshake_timeout = "3s"\nmax_connections_per_client = 1')
    with relay:
        with RawClient(relay.port, source="127.0.0.3"):
            # The silent connection is the one handshake this client may run, so
            # the next is closed before any handshake, without a reply.
            with RawClient(relay.port, source="127.0.0.3") as over:
                assert read_to_close(over, timeout=2) == b""
            lines = client_lines(relay, "127.0.0.3", "reject")
            [reject] = [line for line in lines if " reject " in line]
            assert field(reject, "reply").startswith("421 4.7.0")
            assert field(reject, "listener") == f"127.0.0.1:{relay.port}"
            # A trusted client is exempt from the per-client limit, as for sessions.
            check_service(relay, "127.0.0.2")


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_failed_handshakes_leave_limit(tmp_path: Path, event_loop: str) -> None:
    """Failed handshakes neither take nor give back a slot of the per-client connection limit."""
    relay = tls_relay(tmp_path, event_loop, server="max_connections_per_client = 1")
    with relay:
        for _ in range(3):
            with RawClient(relay.port, source="127.0.0.3") as raw:
                raw.send(EHLO)
                read_to_close(raw)
        with tls_client(relay, "127.0.0.3") as first:
            first.exchange(b"", ["220 mx.example.test"])
            with tls_client(relay, "127.0.0.3") as second:
                second.exchange(b"", ["421 4.7.0"])
            first.exchange(b"QUIT\r\n", ["221"])
        lines = client_lines(relay, "127.0.0.3", "disconnect")
        assert event_names(lines).count("tls_failed") == 3, lines


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_renegotiation_ends_session_logged(tmp_path: Path, event_loop: str) -> None:
    """A TLS 1.2 client that asks to renegotiate is rejected, and the disconnect line names the TLS error."""
    with tls_relay(tmp_path, event_loop) as relay:
        command = [
            "openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{relay.port}", "-servername", "localhost",
        ]
        client = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert client.stdin is not None
            # An "R" line makes s_client start a renegotiation once its handshake is done.
            client.stdin.write(b"R\n")
            client.stdin.flush()
            lines = client_lines(relay, "127.0.0.1", "disconnect", timeout=10)
        finally:
            client.kill()
            output = client.communicate(timeout=10)[0].decode(errors="replace")
        assert "RENEGOTIATING" in output, output
        sessions = [line for line in lines if " connect " in line or " tls " in line or " disconnect " in line]
        assert event_names(sessions) == ["connect", "tls", "disconnect"], lines
        assert field(sessions[1], "version") == "TLSv1.2"
        # The server rejected the renegotiation, so the client gave up with an alert.
        error = field(sessions[2], "error")
        assert "ALERT" in error, sessions[2]
        assert "_ssl.c" not in error, sessions[2]
        check_service(relay, "127.0.0.3")


# -- STARTTLS, which shares the reasons -----------------------------------------


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_starttls_failures_logged_in_order(tmp_path: Path, event_loop: str) -> None:
    """A failed STARTTLS handshake is logged with its reason between the session's connect and disconnect."""
    relay = tls_relay(tmp_path, event_loop, tls="starttls", server='tls_handshake_timeout = "1s"')
    cases = [
        ("127.0.0.3", EHLO, "not a TLS handshake, plaintext SMTP perhaps (WRONG_VERSION_NUMBER)"),
        ("127.0.0.4", b"", "handshake timed out"),
    ]
    with relay:
        for source, after_starttls, reason in cases:
            with RawClient(relay.port, source=source) as raw:
                raw.exchange(b"", ["220"])
                raw.exchange(EHLO, ["250"])
                raw.exchange(b"STARTTLS\r\n", ["220 2.0.0"])
                raw.send(after_starttls)
                read_to_close(raw)
            lines = client_lines(relay, source, "disconnect")
            assert event_names(lines) == ["connect", "tls_failed", "disconnect"], lines
            assert field(lines[1], "error") == reason


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_implicit_listener_closed_before_accepting(event_loop: str) -> None:
    # A worker that gets a stop signal while it starts closes its listeners
    # before their accept tasks first run.  A socket left open would keep its SO_REUSEPORT
    # share of new connections, which nothing accepts.
    from types import SimpleNamespace

    from relay.smtp.implicit import ImplicitTLSListener

    async def close_at_once() -> list[socket.socket]:
        loop = asyncio.get_running_loop()
        runtime = SimpleNamespace(listener=SimpleNamespace(address=("127.0.0.1", 0)), loop=loop, name="smtps")
        listener = ImplicitTLSListener(runtime, 8)  # type: ignore[arg-type]
        listener.close()
        await asyncio.sleep(0.05)
        return listener.sockets

    runner = asyncio.run if event_loop == "asyncio" else uvloop.run
    sockets = runner(close_at_once())
    assert sockets
    assert [sock.fileno() for sock in sockets] == [-1] * len(sockets)


# -- [tls] min_version ---------------------------------------------------------


def openssl_client(relay: RelayProcess, version_option: str, *, starttls: bool) -> str:
    """Connect with ``openssl s_client`` offering one old TLS version; return its output.

    ``-cipher DEFAULT:@SECLEVEL=0`` makes this OpenSSL 3 behave like the old
    OpenSSL of a printer or scanner, which offers TLS 1.0 with SHA-1 suites.
    """
    command = [
        "openssl", "s_client", version_option, "-cipher", "DEFAULT:@SECLEVEL=0",
        "-connect", f"127.0.0.1:{relay.port}", "-servername", "localhost",
    ]
    if starttls:
        command += ["-starttls", "smtp"]
    done = subprocess.run(command, input=b"QUIT\r\n", capture_output=True, timeout=30)
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


def tls_versions_logged(relay: RelayProcess, count: int, timeout: float = 5.0) -> list[str]:
    """Wait until ``count`` ``tls`` lines are logged; return their versions."""
    deadline = time.monotonic() + timeout
    while True:
        versions = [field(line, "version") for line in relay.log().splitlines() if " tls " in line]
        if len(versions) >= count or time.monotonic() > deadline:
            return versions
        time.sleep(0.05)


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
@pytest.mark.parametrize("listener_tls", ["starttls", "implicit"])
def test_lowered_floor_serves_tls_1_0_client(tmp_path: Path, event_loop: str, listener_tls: str) -> None:
    relay = tls_relay(tmp_path, event_loop, tls=listener_tls, tls_settings='min_version = "TLSv1"')
    with relay:
        for option, version in (("-tls1", "TLSv1"), ("-tls1_1", "TLSv1.1")):
            output = openssl_client(relay, option, starttls=listener_tls == "starttls")
            assert f"Protocol  : {version}\n" in output, output
            assert "Cipher is (NONE)" not in output, output
        versions = tls_versions_logged(relay, 2)
        assert versions == ["TLSv1", "TLSv1.1"], relay.log()
        # A modern client still gets the newest version.
        output = openssl_client(relay, "-tls1_3", starttls=listener_tls == "starttls")
        # s_client prints no session block for TLS 1.3 without a session ticket.
        assert "New, TLSv1.3, Cipher is " in output, output


@pytest.mark.parametrize("listener_tls", ["starttls", "implicit"])
def test_default_floor_rejects_tls_1_0_client(tmp_path: Path, listener_tls: str) -> None:
    with tls_relay(tmp_path, "uvloop", tls=listener_tls) as relay:
        output = openssl_client(relay, "-tls1", starttls=listener_tls == "starttls")
        # s_client prints a session block with the version offered even when the handshake failed.
        assert "New, (NONE), Cipher is (NONE)" in output, output
        # The implicit-TLS listener also logs the start-up probe, which closed before its handshake.
        deadline = time.monotonic() + 5
        while "(UNSUPPORTED_PROTOCOL)" not in relay.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        failures = [line for line in relay.log().splitlines() if " tls_failed " in line]
        assert any(field(line, "error").endswith("(UNSUPPORTED_PROTOCOL)") for line in failures), relay.log()
