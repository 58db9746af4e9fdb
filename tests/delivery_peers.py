"""Loopback peers for the delivery tests: an nsd serving a .test zone, aiosmtpd upstreams, test certificates.

Everything listens on 127.0.0.0/8 or ::1 and every process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from conftest import free_port, require_peer

ZONE = """$ORIGIN test.
$TTL 300
@ IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
@ IN NS ns.test.
ns IN A 127.0.0.1
mx IN MX 10 a.mx.test.
mx IN MX 20 b.mx.test.
a.mx IN A 127.0.0.2
b.mx IN A 127.0.0.3
equal IN MX 10 a.mx.test.
equal IN MX 10 b.mx.test.
implicit IN A 127.0.0.4
null IN MX 0 .
null IN A 127.0.0.5
alias IN CNAME mx.test.
six IN MX 10 v6.six.test.
v6.six IN AAAA ::1
two-mx IN MX 10 gone.test.
two-mx IN MX 20 b.mx.test.
text-only IN TXT "no mail here"
many IN MX 10 m1.many.test.
many IN MX 20 m2.many.test.
many IN MX 30 m3.many.test.
many IN MX 40 m4.many.test.
many IN MX 50 m5.many.test.
many IN MX 60 m6.many.test.
m1.many IN A 127.0.0.21
m2.many IN A 127.0.0.22
m3.many IN A 127.0.0.23
m4.many IN A 127.0.0.24
m5.many IN A 127.0.0.25
m6.many IN A 127.0.0.26
*.wild IN A 127.0.0.4
loop IN MX 10 lo.loop.test.
lo.loop IN A 127.0.0.1
zero IN MX 10 z.zero.test.
z.zero IN A 0.0.0.0
mapped IN MX 10 m.mapped.test.
m.mapped IN AAAA ::ffff:127.0.0.1
backup IN MX 10 p.backup.test.
backup IN MX 20 self.backup.test.
backup IN MX 20 peer.backup.test.
backup IN MX 30 last.backup.test.
p.backup IN A 192.0.2.10
self.backup IN A 127.0.0.1
peer.backup IN A 192.0.2.20
last.backup IN A 192.0.2.30
dual IN MX 10 v6.dual.test.
dual IN MX 20 v4.dual.test.
v6.dual IN AAAA 2001:db8::1
v6.dual IN AAAA 2001:db8::2
v6.dual IN AAAA 2001:db8::3
v6.dual IN AAAA 2001:db8::4
v6.dual IN AAAA 2001:db8::5
v6.dual IN AAAA 2001:db8::6
v4.dual IN A 192.0.2.40
dual-stack IN MX 10 ds.dual-stack.test.
ds.dual-stack IN AAAA 2001:db8::10
ds.dual-stack IN AAAA 2001:db8::11
ds.dual-stack IN A 192.0.2.50
ds.dual-stack IN A 192.0.2.51
xn--strae-oqa IN A 127.0.0.31
strasse IN A 127.0.0.32
*.dead IN A 127.0.0.9
numeric IN MX 10 127.0.0.7.
numeric-self IN MX 10 127.0.0.1.
numeric-ll IN MX 10 169.254.0.25.
numeric-ll IN MX 20 fe80::25.
looks-numeric IN MX 10 127.0.0.7.test.
127.0.0.7 IN A 127.0.0.8
primary-down IN MX 10 x.broken.test.
primary-down IN MX 20 lo.loop.test.
primary-gone IN MX 10 gone.test.
primary-gone IN MX 20 lo.loop.test.
"""


@dataclass
class NameServer:
    """A running nsd answering for ``test.`` and failing (SERVFAIL) for ``broken.test.``."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        return (("127.0.0.1", self.port),)


@contextmanager
def run_nsd(directory: Path, zone: str = ZONE) -> Iterator[NameServer]:
    """Run nsd in the foreground on 127.0.0.1 at a free port until the block ends."""
    nsd = require_peer("nsd")
    port = free_port()
    (directory / "test.zone").write_text(zone)
    config = directory / "nsd.conf"
    config.write_text(
        f"""server:
    ip-address: 127.0.0.1@{port}
    username: ""
    chroot: ""
    zonesdir: "{directory}"
    database: ""
    pidfile: "{directory}/nsd.pid"
    xfrdfile: "{directory}/xfrd.state"
    zonelistfile: "{directory}/zone.list"
    logfile: "{directory}/nsd.log"
    server-count: 1
    verbosity: 1
remote-control:
    control-enable: no
zone:
    name: "test"
    zonefile: "test.zone"
zone:
    name: "broken.test"
    zonefile: "missing.zone"
"""
    )
    process = subprocess.Popen([nsd, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_udp(port)
        yield NameServer(port, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_udp(port: int) -> None:
    # A minimal DNS query for "test. SOA"; any reply means nsd is serving.
    query = bytes.fromhex("abcd01000001000000000000") + b"\x04test\x00\x00\x06\x00\x01"
    deadline = time.monotonic() + 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        while time.monotonic() < deadline:
            probe.sendto(query, ("127.0.0.1", port))
            try:
                probe.recvfrom(512)
                return
            except OSError:
                continue
    raise RuntimeError(f"nsd did not answer on 127.0.0.1:{port} within 10 s")


def make_certificate(directory: Path, name: str = "smarthost.test") -> tuple[Path, Path]:
    """Write a self-signed certificate for ``name``, 127.0.0.1 and 127.0.0.6 and its key; return both paths."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1,IP:127.0.0.6", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@dataclass
class Received:
    """One message an upstream accepted."""

    sender: str
    recipients: list[str]
    data: bytes
    mail_options: list[str]
    rcpt_options: list[str]
    tls: bool
    peer: Any


@dataclass
class RecordingHandler:
    """aiosmtpd handler that stores messages and can refuse chosen recipients."""

    messages: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    # Like ``refuse``, but only for the recipient's first RCPT: a retry is accepted however soon it comes.
    reject_once: dict[str, str] = field(default_factory=dict)
    connections: int = 0
    active: int = 0
    max_active: int = 0
    data_reply: str = "250 2.0.0 OK"
    pipelining: bool = False  # offer PIPELINING in the EHLO reply
    helo_reply: str = ""  # when set, the reply to both EHLO and HELO instead of accepting them
    drop_after: set[str] = field(default_factory=set)  # close without a reply after the data for these recipients
    dropped: list[Received] = field(default_factory=list)  # messages whose end of data got no reply
    # Ends of data after which the client's next command had already arrived before the reply.
    commands_pipelined_after_data: int = 0
    rcpt_delay: dict[str, float] = field(default_factory=dict)  # recipient -> seconds before its RCPT reply
    data_delay: float = 0.0  # seconds before the reply to the end of data
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        # aiosmtpd passes every line of its reply, the last one ("250 HELP") included.
        if self.helo_reply:
            return [self.helo_reply]
        session.host_name = hostname
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        if self.helo_reply:
            return self.helo_reply
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay[address])
        if address in self.refuse:
            return self.refuse[address]
        with self.lock:
            once = self.reject_once.pop(address, None)
        if once is not None:
            return once
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        received = Received(
            sender=str(envelope.mail_from),
            recipients=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            tls=session.ssl is not None,
            peer=session.peer,
        )
        with self.lock:
            # Bytes already read past the end of data are the client's next commands.
            if server._reader is not None and server._reader._buffer:  # type: ignore[attr-defined]
                self.commands_pipelined_after_data += 1
            if self.drop_after.intersection(received.recipients):
                self.dropped.append(received)
                # abort, not close: a closing asyncio transport still sends the reply written after it.
                server.transport.abort()
                return "250 2.0.0 OK (never sent: the connection is aborted)"
            if self.data_reply.startswith("250"):
                self.messages.append(received)
        return self.data_reply


class CountingSMTP(SMTP):
    """aiosmtpd server that counts connections and the most open at once."""

    def connection_made(self, transport: Any) -> None:
        handler: RecordingHandler = self.event_handler
        with handler.lock:
            handler.connections += 1
            handler.active += 1
            handler.max_active = max(handler.max_active, handler.active)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        handler: RecordingHandler = self.event_handler
        with handler.lock:
            handler.active -= 1
        super().connection_lost(error)


class UpstreamController(Controller):
    def factory(self) -> SMTP:
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


def accept_login(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    """Accept user ``relay`` with password ``secret`` and reject anything else with 535."""
    ok = isinstance(data, LoginPassword) and data.login == b"relay" and data.password == b"secret"
    # aiosmtpd 1.4 sends no reply to a failed AUTH unless handled is False.
    return AuthResult(success=ok, handled=ok)


@contextmanager
def run_upstream(
    host: str, port: int, handler: RecordingHandler | None = None, **smtp: Any
) -> Iterator[RecordingHandler]:
    """Run an aiosmtpd upstream on host:port in a thread until the block ends."""
    handler = handler or RecordingHandler()
    controller = UpstreamController(handler, hostname=host, port=port, ready_timeout=10, **smtp)
    controller.start()
    # The controller's own readiness probe is not a delivery connection.
    with handler.lock:
        handler.connections = 0
    try:
        yield handler
    finally:
        controller.stop()


@contextmanager
def run_smtp_sink(host: str, port: int, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run Postfix's smtp-sink on host:port with extra options until the block ends."""
    sink = require_peer("smtp-sink")
    # smtp-sink refuses to run as root without a user to switch to.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen([sink, *user, *options, f"{host}:{port}", "100"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
