"""The outbound SMTP client against scripted next hops: the outbound cases of the hostile-input catalogue."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import free_port
from relay.delivery import client
from relay.delivery.client import (
    OutboundMessage,
    OutboundRecipient,
    SessionError,
    SessionOptions,
    SMTPSession,
    Timeouts,
)
from relay.delivery.dns import MXResolver
from relay.delivery.router import Route
from relay.delivery.sessions import SessionPool
from relay.spool import Outcome
from tests.delivery_peers import make_certificate, run_smtp_sink, run_upstream
from tests.server_helpers import RelayProcess, strip_received

EHLO_PLAIN = b"250-mx.example.net\r\n250 8BITMIME\r\n"
EHLO_CHUNKING = b"250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 CHUNKING\r\n"
EHLO_CHUNKING_ONLY = b"250-mx.example.net\r\n250 CHUNKING\r\n"
EHLO_BINARYMIME = b"250-mx.example.net\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 BINARYMIME\r\n"
OPTIONS = SessionOptions(helo_name="relay.example.test", tls="none", timeouts=Timeouts(connect=2, greeting=2, helo=2,
                         mail=2, rcpt=2, data_init=2, data_block=2, data_done=2, rset=2))


@dataclasses.dataclass
class SplitReply:
    """A reply sent in two writes with a pause between them."""

    first: bytes
    pause: float
    rest: bytes


# The server's reply to one verb, or a list of replies to successive commands with that verb.
Planned = bytes | SplitReply | list[bytes | SplitReply]


class ScriptedServer:
    """A next hop that answers each command by its verb and records every line the client sends."""

    def __init__(
        self, replies: dict[str, Planned], greeting: bytes = b"220 mx.example.net ESMTP\r\n"
    ) -> None:
        # A list answers successive commands with the same verb in turn.
        self.replies: dict[str, Planned] = {
            "EHLO": EHLO_PLAIN, "MAIL": b"250 ok\r\n", "RCPT": b"250 ok\r\n", "DATA": b"354 go\r\n",
            ".": b"250 queued\r\n", "BDAT": b"250 queued\r\n", "RSET": b"250 ok\r\n", "QUIT": b"221 bye\r\n",
            **replies,
        }
        self.greeting = greeting
        self.lines: list[bytes] = []
        self.data = b""
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(self.greeting)
        in_data = False
        try:
            while line := await reader.readline():
                if in_data:
                    self.data += line
                    if line != b".\r\n":
                        continue
                    in_data = False
                    verb = "."
                else:
                    self.lines.append(line)
                    verb = line.split(b" ")[0].rstrip(b"\r\n").upper().decode()
                    if verb == "BDAT":
                        # The chunk follows its command and is read whatever the reply is.
                        self.data += await reader.readexactly(int(line.split()[1]))
                planned = self.replies.get(verb, b"500 unknown\r\n")
                reply = planned.pop(0) if isinstance(planned, list) else planned
                if isinstance(reply, SplitReply):
                    writer.write(reply.first)
                    await writer.drain()
                    await asyncio.sleep(reply.pause)
                    reply = reply.rest
                writer.write(reply)
                await writer.drain()
                if verb == "DATA" and reply.startswith(b"354"):
                    in_data = True
                if verb == "QUIT" or reply == b"":
                    break
        finally:
            writer.close()

    def verbs(self) -> list[str]:
        return [line.split(b" ")[0].rstrip(b"\r\n").decode() for line in self.lines]


def run_session(
    server: ScriptedServer, action: Callable[[SMTPSession], object], options: SessionOptions = OPTIONS
) -> object:
    async def main() -> object:
        port = free_port()
        listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
        try:
            session = await SMTPSession.open("mx.example.net", "127.0.0.1", port, options)
            try:
                return await action(session)  # type: ignore[misc]
            finally:
                await session.close()
        finally:
            listener.close()

    return asyncio.run(main())


def message(
    *recipients: str,
    body: bytes = b"Subject: t\r\n\r\nx\r\n",
    orcpt: str | None = None,
    body_type: str | None = None,
    sender: str = "sender@example.com",
) -> OutboundMessage:
    return OutboundMessage(
        queue_id="Q",
        sender=sender,
        recipients=tuple(OutboundRecipient(i, a, orcpt=orcpt) for i, a in enumerate(recipients)),
        body=body,
        body_type=body_type,
    )


@pytest.mark.parametrize("reply", [b"250-a\r\n251 b\r\n", b"25\r\n", b"2500 ok\r\n", b"250-x\r\n" * 12000])
def test_malformed_reply_ends_session_temporarily(reply: bytes) -> None:
    server = ScriptedServer({"MAIL": reply})
    with pytest.raises(SessionError) as caught:
        run_session(server, lambda session: session.send(message("a@example.net")))
    assert caught.value.temporary
    assert "DATA" not in server.verbs()
    # The parser's reason follows the peer, so an operator sees what was wrong.
    assert caught.value.reply.startswith("451 4.5.0 malformed reply from mx.example.net[127.0.0.1]:")
    assert len(caught.value.reply.split(": ", 1)[1]) > 0


def test_long_reply_line_within_limit_accepted() -> None:
    # Longer than RFC 5321's 512 octets; the default limit is 2048.
    text = b"2.1.0 " + b"x" * 1500
    server = ScriptedServer({"MAIL": b"250 " + text + b"\r\n", ".": b"250-" + text + b"\r\n250 queued\r\n"})

    results = run_session(server, lambda session: session.send(message("a@example.net")))

    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]


def test_reply_line_past_limit_cut() -> None:
    # The 250 to the end of data means the next hop has the message: a line
    # past the limit must not turn it into a deferral and a second copy.
    long_text = b"2.0.0 queued " + b"x" * 2100
    server = ScriptedServer({"RCPT": b"250 " + b"y" * 600 + b"\r\n", ".": b"250 " + long_text + b"\r\n"})
    options = dataclasses.replace(OPTIONS, reply_line_limit=512)

    results = run_session(server, lambda session: session.send(message("a@example.net")), options)

    (result,) = results  # type: ignore[attr-defined]
    assert result.outcome == Outcome.DELIVERED
    # The first 510 octets of the line, before its CRLF, are read: "250 2.0.0 queued " and the text.
    assert result.reply == "250 2.0.0 " + long_text[6:506].decode()
    assert server.verbs().count("DATA") == 1


def test_cut_reply_line_ending_late_keeps_session() -> None:
    # The end of a cut line arrives after a pause: it belongs to the reply before,
    # not to the next command's.
    end_of_data = SplitReply(b"250 2.0.0 queued " + b"x" * 700, 0.1, b"yyyy\r\n")
    server = ScriptedServer({".": [end_of_data, b"250 2.0.0 queued\r\n"]})
    options = dataclasses.replace(OPTIONS, reply_line_limit=512)

    async def two_messages(session: SMTPSession) -> list[list[Outcome]]:
        first = await session.send(message("a@example.net"))
        await asyncio.sleep(0.3)
        second = await session.send(message("b@example.net"))
        return [[r.outcome for r in first], [r.outcome for r in second]]

    outcomes = run_session(server, two_messages, options)

    assert outcomes == [[Outcome.DELIVERED], [Outcome.DELIVERED]]
    assert server.verbs().count("DATA") == 2


def test_flood_of_unread_replies_bounded() -> None:
    # A parked session takes no replies, so reading stops at UNREAD_LIMIT.
    server = ScriptedServer({"EHLO": EHLO_PLAIN + b"250-x\r\n" * 300_000})

    async def parked_then_used(session: SMTPSession) -> object:
        await asyncio.sleep(0.5)
        buffered.append(session._connection.parser.buffered)
        return await session.send(message("a@example.net"))

    buffered: list[int] = []
    with pytest.raises(SessionError) as caught:
        run_session(server, parked_then_used)

    # At most one read past the limit; the server sent 2.1 MB.
    assert client.UNREAD_LIMIT < buffered[0] < 2 * client.UNREAD_LIMIT
    assert "sent a reply that no command asked for" in caught.value.reply
    assert "DATA" not in server.verbs()


def test_many_pipelined_replies_unread_for_a_while() -> None:
    # The next message's MAIL, RCPT and DATA go out with this body; 999 long 550
    # replies (about 290 KB) wait while the caller records the first result.
    reject = b"".join(
        b"550" + separator + b" 5.1.1 no such user here, please check the address and try again\r\n"
        for separator in (b"-", b"-", b"-", b" ")
    )
    server = ScriptedServer({"EHLO": EHLO_PIPELINING, "RCPT": [b"250 ok\r\n", b"250 ok\r\n"] + [reject] * 999})
    first = message("a@example.net")
    second = message("b@example.net", *(f"u{n}@example.net" for n in range(999)))

    async def pipelined(session: SMTPSession) -> list[list[Outcome]]:
        first_results = await session.send(first, following=second)
        await asyncio.sleep(0.3)
        second_results = await session.send(second)
        return [[r.outcome for r in first_results], sorted({r.outcome for r in second_results})]

    outcomes = run_session(server, pipelined)

    assert outcomes == [[Outcome.DELIVERED], [Outcome.DELIVERED, Outcome.FAILED]]
    assert server.verbs().count("DATA") == 2


def test_multiline_greeting_and_bare_code_accepted() -> None:
    server = ScriptedServer({"EHLO": b"250-mx.example.net\r\n250-\r\n250\r\n"},
                            greeting=b"220-mx.example.net\r\n220 ESMTP\r\n")
    results = run_session(server, lambda session: session.send(message("a@example.net")))
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]


def test_no_data_after_every_rcpt_refused() -> None:
    server = ScriptedServer({"RCPT": b"550 5.1.1 no such user\r\n"})
    results = run_session(server, lambda session: session.send(message("a@example.net")))
    assert [r.outcome for r in results] == [Outcome.FAILED]  # type: ignore[attr-defined]
    assert "DATA" not in server.verbs()
    assert "RSET" in server.verbs()


def test_per_recipient_outcomes() -> None:
    rcpt_replies = [b"450 4.2.1 try later\r\n", b"550 5.1.1 unknown\r\n", b"250 ok\r\n"]
    server = ScriptedServer({"RCPT": rcpt_replies})
    outgoing = message("a@example.net", "b@example.net", "c@example.net")
    results = run_session(server, lambda session: session.send(outgoing))
    outcomes = [r.outcome for r in results]  # type: ignore[attr-defined]
    assert outcomes == [Outcome.DEFERRED, Outcome.FAILED, Outcome.DELIVERED]
    assert server.verbs().count("DATA") == 1


@pytest.mark.parametrize("ehlo", [EHLO_PLAIN, EHLO_CHUNKING], ids=["data", "bdat"])
def test_other_2xx_replies_mean_success(ehlo: bytes) -> None:
    # RFC 5321 section 4.2.1: a client acts on the first digit of a code it
    # does not expect.  Deferring on a 251 to the end of data would make
    # every retry send the next hop one more copy.
    server = ScriptedServer({
        "EHLO": ehlo,
        "MAIL": b"251 2.1.0 ok\r\n",
        "RCPT": [b"252 2.1.5 cannot verify, will try\r\n", b"251 2.1.5 will forward\r\n"],
        ".": b"251 2.0.0 queued\r\n",
        "BDAT": b"251 2.0.0 queued\r\n",
    })
    outgoing = message("a@example.net", "b@example.net")

    results = run_session(server, lambda session: session.send(outgoing))

    outcomes = [r.outcome for r in results]  # type: ignore[attr-defined]
    assert outcomes == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert [r.reply for r in results] == ["251 2.0.0 queued"] * 2  # type: ignore[attr-defined]
    assert "RSET" not in server.verbs()
    assert server.data.count(b"Subject: t") == 1


def test_refusing_greeting_gets_only_quit() -> None:
    # Temporary all the same, as with Postfix's smtp_skip_5xx_greeting: the next MX is tried.
    server = ScriptedServer({}, greeting=b"554 5.7.1 not allowed\r\n")
    with pytest.raises(SessionError) as caught:
        run_session(server, lambda session: session.send(message("a@example.net")))
    assert caught.value.temporary
    # The deferral carries a temporary status, so a delay DSN does not contradict itself.
    assert caught.value.reply == "454 4.7.1 not allowed"
    assert server.verbs() == ["QUIT"]


def test_busy_greeting_is_temporary() -> None:
    server = ScriptedServer({}, greeting=b"421 4.3.2 busy\r\n")
    with pytest.raises(SessionError) as caught:
        run_session(server, lambda session: session.send(message("a@example.net")))
    assert caught.value.temporary


def test_lines_starting_with_dot_are_stuffed() -> None:
    body = b"Subject: t\r\n..\r\nRCPT TO:<spoof@example.org>\r\n\r\n..\r\n..x\r\n"
    server = ScriptedServer({})
    run_session(server, lambda session: session.send(message("a@example.net", body=body)))
    assert server.data == b"Subject: t\r\n...\r\nRCPT TO:<spoof@example.org>\r\n\r\n...\r\n...x\r\n.\r\n"
    assert server.verbs().count("RCPT") == 1


def test_crlf_in_arguments_never_sent() -> None:
    server = ScriptedServer({"EHLO": b"250-mx.example.net\r\n250 DSN\r\n"})
    outgoing = message("rcpt@example.org", "bad@example.org\r\nRCPT TO:<x@example.org>",
                       orcpt="rfc822;a+0D+0ARCPT+20TO:<x@example.org>")
    results = run_session(server, lambda session: session.send(outgoing))
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.FAILED]  # type: ignore[attr-defined]
    rcpt_lines = [line for line in server.lines if line.startswith(b"RCPT")]
    assert rcpt_lines == [b"RCPT TO:<rcpt@example.org> ORCPT=rfc822;a+0D+0ARCPT+20TO:<x@example.org>\r\n"]


def test_broken_opportunistic_tls_retried_in_plaintext() -> None:
    class BrokenTLS(ScriptedServer):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            if self.connections > 1:
                self.connections -= 1
                await super().handle(reader, writer)
                return
            writer.write(self.greeting)
            await reader.readline()
            writer.write(b"250-mx.example.net\r\n250 STARTTLS\r\n")
            await reader.readline()
            writer.write(b"220 go ahead\r\n" + bytes(range(16)))
            await writer.drain()
            writer.close()

    server = BrokenTLS({"EHLO": b"250-mx.example.net\r\n250 STARTTLS\r\n"})

    async def main() -> object:
        port = free_port()
        listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
        pool = SessionPool(MXResolver((("127.0.0.1", 9),)), "relay.example.test", OPTIONS.timeouts)
        route = Route(kind="smtp", destination="d", host="127.0.0.1", port=port, use_mx=False, tls="opportunistic")
        try:
            session = await pool.acquire(route)
            result = await session.send(message("a@example.net"))
            await session.close()
            return result
        finally:
            listener.close()

    results = asyncio.run(main())
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert "STARTTLS" not in server.verbs()


EHLO_STARTTLS = b"250-mx.example.net\r\n250 STARTTLS\r\n"


@pytest.mark.parametrize("tls", ["required", "opportunistic"])
def test_reply_pipelined_after_starttls_220(tls: str) -> None:
    # A reply sent in plaintext behind the 220 could come from anyone on the
    # path (CVE-2011-0411's kind of injection).  Read after the handshake, it
    # would be taken as the reply to a command sent over TLS.
    server = ScriptedServer({"EHLO": EHLO_STARTTLS, "STARTTLS": b"220 2.0.0 go ahead\r\n250 2.1.0 injected\r\n"})
    options = dataclasses.replace(OPTIONS, tls=tls)

    with pytest.raises(SessionError) as raised:
        run_session(server, lambda session: session.send(message("a@example.net")), options)

    assert raised.value.reply.startswith("451 4.7.0 ")
    assert raised.value.reply.endswith(" sent data after its STARTTLS reply")
    assert raised.value.tls_failed
    assert "MAIL" not in server.verbs()


def test_required_tls_without_starttls_defers() -> None:
    server = ScriptedServer({"EHLO": b"250-mx.example.net\r\n250 AUTH PLAIN\r\n"})
    options = dataclasses.replace(OPTIONS, tls="required", username="relay", password="secret")

    with pytest.raises(SessionError) as raised:
        run_session(server, lambda session: session.send(message("a@example.net")), options)

    assert raised.value.reply.startswith("451 4.7.4 TLS is required but ")
    assert raised.value.reply.endswith(" does not offer STARTTLS")
    assert raised.value.temporary
    assert server.verbs() == ["EHLO", "QUIT"]


@pytest.mark.parametrize(
    ("tls", "trusted", "address", "delivered"),
    [
        ("required", False, "127.0.0.1", False),
        ("required", True, "127.0.0.3", False),
        ("required", True, "127.0.0.1", True),
        ("opportunistic", False, "127.0.0.3", True),
    ],
)
def test_next_hop_certificate_by_tls_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tls: str, trusted: bool, address: str, delivered: bool
) -> None:
    # The next hop's self-signed certificate names 127.0.0.1 but not 127.0.0.3.
    # Under "required" it must be trusted (tls_ca_file) and name the next hop,
    # and a failed check defers without a retry in plaintext.  "opportunistic"
    # encrypts without checking.
    cert, key = make_certificate(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    port = free_port(address)
    route = Route(kind="smtp", destination="d", host=address, port=port, use_mx=False, tls=tls)

    async def main() -> object:
        resolver = MXResolver((("127.0.0.1", 9),))
        pool = SessionPool(resolver, "relay.example.test", OPTIONS.timeouts, ca_file=str(cert) if trusted else "")
        session = await pool.acquire(route)
        result = await session.send(message("a@example.net"))
        await session.close()
        return result

    with run_upstream(address, port, tls_context=server_tls, require_starttls=True) as upstream:
        if delivered:
            results = asyncio.run(main())
            assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
        else:
            with pytest.raises(SessionError) as raised:
                asyncio.run(main())
            assert raised.value.reply.startswith("451 4.7.5 TLS handshake with ")
            assert "CERTIFICATE_VERIFY_FAILED" in raised.value.reply

    assert [m.tls for m in upstream.messages] == ([True] if delivered else [])
    # A failed certificate check under "required" is not retried without STARTTLS.
    assert "tls_fallback" not in caplog.text


def test_ca_file_replaced_takes_effect_at_next_session(tmp_path: Path) -> None:
    # Client TLS contexts are built once and shared, because building one
    # reads the CA store (about 15 ms of CPU).  A CA file replaced under the
    # same name must still be read again for the next session.
    (tmp_path / "hop").mkdir()
    (tmp_path / "other").mkdir()
    cert, key = make_certificate(tmp_path / "hop")
    other, _ = make_certificate(tmp_path / "other")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(other.read_bytes())
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    port = free_port()
    route = Route(kind="smtp", destination="d", host="127.0.0.1", port=port, use_mx=False, tls="required")

    async def send_once() -> object:
        pool = SessionPool(MXResolver((("127.0.0.1", 9),)), "relay.example.test", OPTIONS.timeouts,
                           ca_file=str(ca_file))
        session = await pool.acquire(route)
        result = await session.send(message("a@example.net"))
        await session.close()
        return result

    with run_upstream("127.0.0.1", port, tls_context=server_tls, require_starttls=True) as upstream:
        with pytest.raises(SessionError) as raised:
            asyncio.run(send_once())
        assert "CERTIFICATE_VERIFY_FAILED" in raised.value.reply

        ca_file.write_bytes(cert.read_bytes())
        results = asyncio.run(send_once())
        assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]

    assert [m.tls for m in upstream.messages] == [True]
    # The same settings share one context.
    assert client.tls_context("required", str(ca_file)) is client.tls_context("required", str(ca_file))
    assert client.tls_context("opportunistic", "", "TLSv1") is client.tls_context("opportunistic", "", "TLSv1")


class CountingWrites:
    """Wraps a session's write method and counts its calls."""

    def __init__(self, session: SMTPSession) -> None:
        self.writes = 0
        self._write = session._write
        session._write = self._count  # type: ignore[method-assign]

    def _count(self, data: bytes) -> None:
        self.writes += 1
        self._write(data)


def test_bdat_pipelined_in_one_write() -> None:
    body = b"Subject: t\r\n.\r\n..x\r\nbare\nlf\r\n"
    server = ScriptedServer({"EHLO": EHLO_CHUNKING})

    async def send(session: SMTPSession) -> tuple[object, int]:
        counter = CountingWrites(session)
        results = await session.send(message("a@example.net", body=body))
        return results, counter.writes

    results, writes = run_session(server, send)  # type: ignore[misc]
    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    assert writes == 1
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "BDAT", "QUIT"]
    assert server.lines[1] == f"MAIL FROM:<sender@example.com> SIZE={len(body)}\r\n".encode()
    assert server.lines[3] == f"BDAT {len(body)} LAST\r\n".encode()
    assert server.data == body


def test_bdat_body_larger_than_one_write() -> None:
    body = b"Subject: t\r\n\r\n" + bytes(range(256)) * (3 * client.DATA_CHUNK // 256) + b"\r\n"
    # The body has 8-bit octets, which go unconverted only to a next hop with 8BITMIME.
    server = ScriptedServer({"EHLO": EHLO_CHUNKING.replace(b"250 CHUNKING", b"250-8BITMIME\r\n250 CHUNKING")})
    results = run_session(server, lambda session: session.send(message("a@example.net", body=body)))
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert server.data == body


def test_bdat_rcpt_outcomes_mixed() -> None:
    rcpt_replies = [b"450 4.2.1 try later\r\n", b"550 5.1.1 unknown\r\n", b"250 ok\r\n"]
    server = ScriptedServer({"EHLO": EHLO_CHUNKING, "RCPT": rcpt_replies, "BDAT": b"250 2.0.0 queued as X\r\n"})
    outgoing = message("a@example.net", "b@example.net", "c@example.net")
    results = run_session(server, lambda session: session.send(outgoing))
    outcomes = [r.outcome for r in results]  # type: ignore[attr-defined]
    replies = [r.reply for r in results]  # type: ignore[attr-defined]
    assert outcomes == [Outcome.DEFERRED, Outcome.FAILED, Outcome.DELIVERED]
    assert replies == ["450 4.2.1 try later", "550 5.1.1 unknown", "250 2.0.0 queued as X"]
    assert "RSET" not in server.verbs()


@pytest.mark.parametrize("bdat_reply", [b"554 5.5.1 no valid recipients\r\n", b"250 2.0.0 queued\r\n"])
def test_bdat_reply_ignored_without_recipients(bdat_reply: bytes) -> None:
    rcpt_replies = [b"550 5.1.1 unknown\r\n", b"450 4.2.1 try later\r\n"]
    server = ScriptedServer({"EHLO": EHLO_CHUNKING, "RCPT": rcpt_replies, "BDAT": bdat_reply})
    outgoing = message("a@example.net", "b@example.net")
    results = run_session(server, lambda session: session.send(outgoing))
    outcomes = [r.outcome for r in results]  # type: ignore[attr-defined]
    replies = [r.reply for r in results]  # type: ignore[attr-defined]
    assert outcomes == [Outcome.FAILED, Outcome.DEFERRED]
    assert replies == ["550 5.1.1 unknown", "450 4.2.1 try later"]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "BDAT", "RSET", "QUIT"]


def test_bdat_after_refused_mail() -> None:
    server = ScriptedServer({"EHLO": EHLO_CHUNKING, "MAIL": b"451 4.3.0 busy\r\n", "BDAT": b"503 5.5.1 no MAIL\r\n"})
    results = run_session(server, lambda session: session.send(message("a@example.net", "b@example.net")))
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]  # type: ignore[attr-defined]
    assert [r.reply for r in results] == ["451 4.3.0 busy", "451 4.3.0 busy"]  # type: ignore[attr-defined]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "BDAT", "RSET", "QUIT"]


@pytest.mark.parametrize(("bdat_reply", "outcome"), [(b"452 4.3.1 no space\r\n", Outcome.DEFERRED),
                                                      (b"554 5.6.0 rejected\r\n", Outcome.FAILED)])
def test_refused_bdat_decides_and_resets(bdat_reply: bytes, outcome: Outcome) -> None:
    server = ScriptedServer({"EHLO": EHLO_CHUNKING, "RCPT": [b"250 ok\r\n", b"550 5.1.1 unknown\r\n"],
                             "BDAT": bdat_reply})
    results = run_session(server, lambda session: session.send(message("a@example.net", "b@example.net")))
    assert [r.outcome for r in results] == [outcome, Outcome.FAILED]  # type: ignore[attr-defined]
    assert server.verbs()[-2:] == ["RSET", "QUIT"]


def test_bdat_without_pipelining_waits_for_rcpt() -> None:
    body = b"Subject: t\r\n\r\n.x\r\n"
    server = ScriptedServer({"EHLO": EHLO_CHUNKING_ONLY, "RCPT": [b"550 5.1.1 unknown\r\n", b"250 ok\r\n"]})
    results = run_session(server, lambda session: session.send(message("a@example.net", "b@example.net", body=body)))
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "BDAT", "QUIT"]
    assert server.data == body


def test_no_bdat_without_pipelining_or_recipients() -> None:
    server = ScriptedServer({"EHLO": EHLO_CHUNKING_ONLY, "RCPT": b"550 5.1.1 unknown\r\n"})
    results = run_session(server, lambda session: session.send(message("a@example.net")))
    assert [r.outcome for r in results] == [Outcome.FAILED]  # type: ignore[attr-defined]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RSET", "QUIT"]


def test_chunking_off_sends_data() -> None:
    server = ScriptedServer({"EHLO": EHLO_CHUNKING})
    options = dataclasses.replace(OPTIONS, chunking=False)
    results = run_session(server, lambda session: session.send(message("a@example.net")), options)
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert "BDAT" not in server.verbs()
    assert "DATA" in server.verbs()


def test_binarymime_sent_with_bdat() -> None:
    body = b"Content-Transfer-Encoding: binary\r\n\r\n\x00\xff\r.\n\r\n"
    server = ScriptedServer({"EHLO": EHLO_BINARYMIME})
    outgoing = message("a@example.net", body=body, body_type="BINARYMIME")
    results = run_session(server, lambda session: session.send(outgoing))
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert server.lines[1] == b"MAIL FROM:<sender@example.com> BODY=BINARYMIME\r\n"
    assert server.data == body


LONG_HEADERS = b"Subject: long lines\r\nX-Long: " + b" ".join(b"part%d" % i for i in range(400)) + b"\r\n"
LONG_LINE = b"." + b"z" * 2999
LONG_BODY = LONG_HEADERS + b"\r\n" + LONG_LINE + b"\r\nshort\r\n"


def check_folded(sent: bytes) -> None:
    """Check that ``LONG_BODY`` arrived with every line at most 998 octets, folded as documented."""
    assert max(len(line) for line in sent.split(b"\r\n")) == 998
    headers, _, body = sent.partition(b"\r\n\r\n")
    # RFC 5322 section 2.2.3: unfolding removes each CRLF before a blank and restores the field.
    assert headers.replace(b"\r\n ", b" ") + b"\r\n" == LONG_HEADERS
    # The body line has no blank, so CRLF and a space were inserted at 998 octets.
    assert body.split(b"\r\n") == [LONG_LINE[:998], b" " + LONG_LINE[998:1995], b" " + LONG_LINE[1995:2992],
                                     b" " + LONG_LINE[2992:], b"short", b""]


@pytest.mark.parametrize("ehlo", [EHLO_PLAIN, EHLO_CHUNKING])
def test_long_lines_broken_before_sending(ehlo: bytes) -> None:
    # RFC 5321 section 4.5.3.1.6: at most 1000 octets with the CRLF, not counting a stuffed dot.
    server = ScriptedServer({"EHLO": ehlo})
    results = run_session(server, lambda session: session.send(message("a@example.net", body=LONG_BODY)))
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    if ehlo == EHLO_PLAIN:
        assert server.data.endswith(b"\r\n.\r\n")
        assert b"\r\n..zzz" in server.data
        check_folded(server.data.removesuffix(b".\r\n").replace(b"\r\n..", b"\r\n."))
    else:
        check_folded(server.data)
        # SIZE and BDAT count the octets as sent.
        assert server.lines[1] == f"MAIL FROM:<sender@example.com> SIZE={len(server.data)}\r\n".encode()
        assert server.lines[3] == f"BDAT {len(server.data)} LAST\r\n".encode()


def test_line_length_limit_configurable() -> None:
    server = ScriptedServer({})
    options = dataclasses.replace(OPTIONS, line_length_limit=78)
    body = b"Subject: t\r\n\r\n" + b"w " * 100 + b"\r\n"
    run_session(server, lambda session: session.send(message("a@example.net", body=body)), options)
    lines = server.data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 78
    assert server.data.replace(b"\r\n ", b" ") == body + b".\r\n"


def test_binarymime_long_lines_sent_unchanged() -> None:
    body = b"Content-Transfer-Encoding: binary\r\n\r\n" + b"\x00\xff" * 3000 + b"\r\n"
    server = ScriptedServer({"EHLO": EHLO_BINARYMIME})
    outgoing = message("a@example.net", body=body, body_type="BINARYMIME")
    results = run_session(server, lambda session: session.send(outgoing))
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert server.data == body


def test_long_lines_folded_for_real_next_hops(tmp_path: Path) -> None:
    # Real next hops: relay serve takes BDAT, Postfix's smtp-sink takes DATA.
    sink_port = free_port()
    with RelayProcess(tmp_path) as upstream, run_smtp_sink("127.0.0.1", sink_port):
        async def main(port: int) -> object:
            session = await SMTPSession.open("mx.example.test", "127.0.0.1", port, OPTIONS)
            try:
                return await session.send(message("rcpt@example.net", body=LONG_BODY, sender="alice@example.org"))
            finally:
                await session.close()

        for port in (upstream.port, sink_port):
            results = asyncio.run(main(port))
            assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
        bodies = [strip_received(stored_body) for _, stored_body in upstream.spooled()]
    assert len(bodies) == 1
    check_folded(bodies[0])


@pytest.mark.parametrize("ehlo", [EHLO_CHUNKING, EHLO_PLAIN,
                                  b"250-mx.example.net\r\n250-PIPELINING\r\n250 BINARYMIME\r\n"])
def test_binarymime_fails_without_support(ehlo: bytes) -> None:
    server = ScriptedServer({"EHLO": ehlo})
    outgoing = message("a@example.net", body=b"x\x00\r\n", body_type="BINARYMIME")
    results = run_session(server, lambda session: session.send(outgoing))
    assert [r.outcome for r in results] == [Outcome.FAILED]  # type: ignore[attr-defined]
    assert results[0].reply.startswith("554 5.6.3 ")  # type: ignore[index]
    assert "MAIL" not in server.verbs()


def test_bdat_to_relay_serve_with_rcpt_rejections(tmp_path: Path) -> None:
    body = b"Subject: chunked\r\n\r\n.leading dot\r\n" + (b"y" * 98 + b"\r\n") * 700
    outgoing = message("rcpt@example.net", "nobody@example.net", "rcpt@example.net", body=body,
                       sender="alice@example.org")
    with RelayProcess(tmp_path) as upstream:
        async def main() -> object:
            session = await SMTPSession.open("mx.example.test", "127.0.0.1", upstream.port, OPTIONS)
            try:
                assert session.uses_chunking
                first = await session.send(outgoing)
                second = await session.send(outgoing)
                return first, second
            finally:
                await session.close()

        first, second = asyncio.run(main())  # type: ignore[misc]
        spooled = [stored for stored, _ in upstream.spooled()]
        bodies = [strip_received(stored_body) for _, stored_body in upstream.spooled()]
    for results in (first, second):
        assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.FAILED, Outcome.DELIVERED]
        assert results[1].reply.startswith("550 ")
    assert len(spooled) == 2
    assert bodies == [body, body]


def test_smtp_sink_gets_data_not_bdat() -> None:
    # Postfix's smtp-sink (3.7) offers PIPELINING but not CHUNKING, and answers BDAT with 500.
    port = free_port()
    with run_smtp_sink("127.0.0.1", port):
        async def main() -> tuple[bool, object]:
            session = await SMTPSession.open("sink.example.test", "127.0.0.1", port, OPTIONS)
            try:
                return session.uses_chunking, await session.send(message("a@example.net", "b@example.net"))
            finally:
                await session.close()

        uses_chunking, results = asyncio.run(main())
    assert not uses_chunking
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]  # type: ignore[attr-defined]


EHLO_PIPELINING = b"250-mx.example.net\r\n250 PIPELINING\r\n"


def test_next_transaction_pipelined_after_body() -> None:
    server = ScriptedServer({"EHLO": EHLO_PIPELINING})
    first = message("a@example.net")
    second = message("b@example.net", body=b"Subject: two\r\n\r\n.dot\r\n")

    async def send(session: SMTPSession) -> tuple[object, object, object, int]:
        first_results = await session.send(first, second)
        pipelined = session.pipelined
        counter = CountingWrites(session)
        second_results = await session.send(second)
        return first_results, pipelined, second_results, counter.writes

    first_results, pipelined, second_results, writes = run_session(server, send)  # type: ignore[misc]
    assert [r.outcome for r in first_results] == [Outcome.DELIVERED]
    assert pipelined is second
    assert [r.outcome for r in second_results] == [Outcome.DELIVERED]
    # The second message's MAIL, RCPT and DATA went with the first body, so only its body was left to write.
    assert writes == 1
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"]
    assert server.data == b"Subject: t\r\n\r\nx\r\n.\r\nSubject: two\r\n\r\n..dot\r\n.\r\n"


def test_pipelined_transaction_rcpt_rejected() -> None:
    server = ScriptedServer({
        "EHLO": EHLO_PIPELINING,
        "RCPT": [b"250 ok\r\n", b"250 ok\r\n", b"550 5.1.1 no such user\r\n"],
    })

    async def send(session: SMTPSession) -> tuple[object, object]:
        second = message("b@example.net", "c@example.net")
        first_results = await session.send(message("a@example.net"), second)
        return first_results, await session.send(second)

    first_results, second_results = run_session(server, send)  # type: ignore[misc]
    assert [r.outcome for r in first_results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert [r.outcome for r in second_results] == [Outcome.DELIVERED, Outcome.FAILED]  # type: ignore[attr-defined]
    assert second_results[1].reply == "550 5.1.1 no such user"  # type: ignore[index]


def test_pipelined_transaction_every_rcpt_rejected() -> None:
    server = ScriptedServer({
        "EHLO": EHLO_PIPELINING,
        "RCPT": [b"250 ok\r\n", b"450 4.2.1 try later\r\n", b"250 ok\r\n"],
        "DATA": [b"354 go\r\n", b"554 5.5.1 no valid recipients\r\n", b"354 go\r\n"],
    })
    third = message("c@example.net")

    async def send(session: SMTPSession) -> tuple[object, object, object]:
        second = message("b@example.net")
        first_results = await session.send(message("a@example.net"), second)
        second_results = await session.send(second, third)
        return first_results, second_results, await session.send(third)

    first_results, second_results, third_results = run_session(server, send)  # type: ignore[misc]
    assert [r.outcome for r in first_results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert [r.outcome for r in second_results] == [Outcome.DEFERRED]  # type: ignore[attr-defined]
    assert second_results[0].reply == "450 4.2.1 try later"  # type: ignore[index]
    # No body went out for the second message, so the third was sent on its own after RSET.
    assert [r.outcome for r in third_results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "RSET",
                              "MAIL", "RCPT", "DATA", "QUIT"]


def test_drop_after_data_with_pipelined_next() -> None:
    server = ScriptedServer({"EHLO": EHLO_PIPELINING, ".": b""})

    async def send(session: SMTPSession) -> tuple[str, bool]:
        try:
            await session.send(message("a@example.net"), message("b@example.net"))
        except SessionError as exc:
            return exc.reply, session.usable
        raise AssertionError("send returned after the connection was dropped")

    reply, usable = run_session(server, send)  # type: ignore[misc]
    assert reply.startswith("451 4.4.2 ")
    assert not usable


def test_drop_after_pipelined_mail() -> None:
    server = ScriptedServer({"EHLO": EHLO_PIPELINING, "MAIL": [b"250 ok\r\n", b""]})

    async def send(session: SMTPSession) -> tuple[object, str]:
        second = message("b@example.net")
        first_results = await session.send(message("a@example.net"), second)
        try:
            await session.send(second)
        except SessionError as exc:
            return first_results, exc.reply
        raise AssertionError("send returned after the connection was dropped")

    first_results, reply = run_session(server, send)  # type: ignore[misc]
    assert [r.outcome for r in first_results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert reply == "451 4.4.2 connection closed by mx.example.net[127.0.0.1]:" + reply.rsplit(":", 1)[1]


def test_send_rejects_unpipelined_message() -> None:
    server = ScriptedServer({"EHLO": EHLO_PIPELINING})

    async def send(session: SMTPSession) -> str:
        await session.send(message("a@example.net"), message("b@example.net"))
        try:
            await session.send(message("c@example.net"))
        except ValueError as exc:
            return str(exc)
        raise AssertionError("send accepted a message other than the pipelined one")

    assert "pipelined" in run_session(server, send)  # type: ignore[operator]


def test_no_pipelined_next_without_pipelining() -> None:
    server = ScriptedServer({})
    second = message("b@example.net")

    async def send(session: SMTPSession) -> object:
        await session.send(message("a@example.net"), second)
        return session.pipelined

    assert run_session(server, send) is None
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


class SilentAfterEhlo:
    """A next hop that sends its greeting and replies to EHLO, then reads commands and never replies."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.example.net ESMTP\r\n")
        await reader.readline()
        writer.write(EHLO_PIPELINING)
        try:
            while await reader.read(4096):
                pass
        finally:
            writer.close()


@pytest.mark.parametrize("mail_timeout", [0.3, 0.6])
def test_reply_timeout_after_longer_wait(mail_timeout: float) -> None:
    # The greeting and EHLO waits run with a 5 s deadline, so the MAIL wait must time out sooner.
    options = dataclasses.replace(OPTIONS, timeouts=Timeouts(greeting=5, helo=5, mail=mail_timeout, rset=0.2))
    server = SilentAfterEhlo()

    async def main() -> tuple[str, float]:
        port = free_port()
        listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
        loop = asyncio.get_running_loop()
        try:
            session = await SMTPSession.open("mx.example.net", "127.0.0.1", port, options)
            started = loop.time()
            try:
                await session.send(message("a@example.net"))
            except SessionError as exc:
                return exc.reply, loop.time() - started
            finally:
                await session.close()
            raise AssertionError("send returned without a reply")
        finally:
            listener.close()

    reply, elapsed = asyncio.run(main())
    assert reply == "451 4.4.2 timed out waiting for a reply from mx.example.net[127.0.0.1]:" + reply.rsplit(":", 1)[1]
    # The upper bound leaves room for a loaded test machine; a timer left at the 5 s deadline would fail it.
    assert mail_timeout <= elapsed < mail_timeout + 2


@pytest.mark.parametrize("ehlo", [EHLO_PLAIN, EHLO_PIPELINING])
def test_data_answered_250_is_not_delivery(ehlo: bytes) -> None:
    # RFC 5321 section 4.3.2: only 354 lets the body go; a 250 to DATA once
    # counted as delivered, and the message left the spool unsent.
    server = ScriptedServer({"EHLO": ehlo, "DATA": b"250 2.0.0 ok\r\n"})

    with pytest.raises(SessionError) as raised:
        run_session(server, lambda session: session.send(message("a@example.net")))

    assert raised.value.reply.startswith("451 4.5.0 mx.example.net[127.0.0.1]:")
    assert raised.value.reply.endswith(" answered DATA with 250, not 354")
    assert raised.value.temporary
    assert server.data == b""


def test_extra_reply_is_a_desync() -> None:
    # One reply more than asked for puts every later reply on the wrong command.
    server = ScriptedServer({}, greeting=b"220 mx.example.net ESMTP\r\n250 surprise\r\n")

    with pytest.raises(SessionError) as raised:
        run_session(server, lambda session: session.send(message("a@example.net")))

    # Caught before MAIL when the extra reply is already in, else at DATA; never delivered.
    assert raised.value.reply.startswith("451 4.5.0 ")
    assert server.data == b""


def test_reply_waiting_before_mail_is_a_desync() -> None:
    server = ScriptedServer({"EHLO": EHLO_PLAIN + b"250 one more\r\n"})

    with pytest.raises(SessionError) as raised:
        run_session(server, lambda session: session.send(message("a@example.net")))

    assert raised.value.reply.endswith(" sent a reply that no command asked for")
    assert "MAIL" not in server.verbs()


def test_auth_never_in_plaintext_unless_tls_none() -> None:
    # RFC 4616 section 5: PLAIN sends the password itself.  A next hop without
    # STARTTLS (or a path that strips it) must not receive it.
    ehlo = b"250-mx.example.net\r\n250 AUTH PLAIN LOGIN\r\n"
    server = ScriptedServer({"EHLO": ehlo})
    options = dataclasses.replace(OPTIONS, tls="opportunistic", username="relay", password="secret")

    with pytest.raises(SessionError) as raised:
        run_session(server, lambda session: session.send(message("a@example.net")), options)

    assert raised.value.reply.startswith("451 4.7.10 ")
    assert raised.value.temporary
    assert "AUTH" not in server.verbs()

    # relayhost_tls = "none" is the operator's explicit consent to a plaintext AUTH.
    server = ScriptedServer({"EHLO": ehlo, "AUTH": b"235 2.7.0 ok\r\n"})
    options = dataclasses.replace(OPTIONS, tls="none", username="relay", password="secret")
    results = run_session(server, lambda session: session.send(message("a@example.net")), options)
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert "AUTH" in server.verbs()


@pytest.mark.parametrize("ehlo", [EHLO_PLAIN, EHLO_PIPELINING])
def test_rcpt_rejection_survives_later_421(ehlo: bytes) -> None:
    # RFC 5321 section 3.3: a 5xx to RCPT is final for that recipient, even when
    # the session then fails and the other recipients must wait.
    server = ScriptedServer({"EHLO": ehlo, "RCPT": [b"550 5.1.1 unknown user\r\n", b"421 4.3.2 closing\r\n"]})

    with pytest.raises(SessionError) as raised:
        run_session(server, lambda session: session.send(message("bad@example.net", "good@example.net")))

    assert raised.value.reply.startswith("421 4.3.2")
    decided = raised.value.decided
    assert list(decided) == [0]
    assert decided[0].outcome == Outcome.FAILED
    assert decided[0].reply == "550 5.1.1 unknown user"


# -- 8-bit mail for next hops without 8BITMIME (RFC 6152 section 3) -------------

EIGHT_BIT_BODY = b"Subject: t\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nd\xc3\xa9j\xc3\xa0 vu\r\n"
EIGHT_BIT_AS_7BIT = (
    b"Subject: t\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
    b"MIME-Version: 1.0\r\n\r\nd=C3=A9j=C3=A0 vu\r\n"
)


@pytest.mark.parametrize("body_type", ["8BITMIME", None])
def test_8bit_message_converted_without_8bitmime(body_type: str | None) -> None:
    # 8-bit mail often comes without BODY=8BITMIME: the octets decide.
    server = ScriptedServer({"EHLO": EHLO_CHUNKING})
    outgoing = message("a@example.net", body=EIGHT_BIT_BODY, body_type=body_type)
    results = run_session(server, lambda session: session.send(outgoing))
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert [r.downgraded for r in results] == [True]  # type: ignore[attr-defined]
    assert server.data == EIGHT_BIT_AS_7BIT
    # No BODY parameter, and SIZE counts the converted message.
    assert server.lines[1] == f"MAIL FROM:<sender@example.com> SIZE={len(EIGHT_BIT_AS_7BIT)}\r\n".encode()


@pytest.mark.parametrize("body_type", ["8BITMIME", "7BIT", None])
def test_8bit_message_unchanged_with_8bitmime(body_type: str | None) -> None:
    # BODY=8BITMIME goes with any 8-bit body, whatever parameter it came with.
    server = ScriptedServer({})
    outgoing = message("a@example.net", body=EIGHT_BIT_BODY, body_type=body_type)
    results = run_session(server, lambda session: session.send(outgoing))
    assert [r.downgraded for r in results] == [False]  # type: ignore[attr-defined]
    assert server.lines[1] == b"MAIL FROM:<sender@example.com> BODY=8BITMIME\r\n"
    assert server.data == EIGHT_BIT_BODY + b".\r\n"


def test_mime_downgrade_off_fails_8bit_message() -> None:
    server = ScriptedServer({"EHLO": EHLO_CHUNKING})
    options = dataclasses.replace(OPTIONS, mime_downgrade=False)
    outgoing = message("a@example.net", "b@example.net", body=EIGHT_BIT_BODY, body_type="8BITMIME")
    results = run_session(server, lambda session: session.send(outgoing), options)
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.FAILED]  # type: ignore[attr-defined]
    reply = results[0].reply  # type: ignore[index]
    assert reply.startswith("554 5.6.3 mx.example.net[127.0.0.1]:")
    assert reply.endswith("does not support 8BITMIME, which this message needs, and conversion to 7 bit is off"
                          " (delivery.mime_downgrade)")
    assert "MAIL" not in server.verbs()


def test_mime_downgrade_off_sends_7bit_message() -> None:
    server = ScriptedServer({"EHLO": EHLO_CHUNKING})
    options = dataclasses.replace(OPTIONS, mime_downgrade=False)
    outgoing = message("a@example.net", body_type="8BITMIME")
    results = run_session(server, lambda session: session.send(outgoing), options)
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert server.data == outgoing.body


def test_8bit_header_fails_without_8bitmime() -> None:
    server = ScriptedServer({"EHLO": EHLO_CHUNKING})
    outgoing = message("a@example.net", body=b"Subject: caf\xc3\xa9\r\n\r\nx\r\n", body_type="8BITMIME")
    results = run_session(server, lambda session: session.send(outgoing))
    assert [r.outcome for r in results] == [Outcome.FAILED]  # type: ignore[attr-defined]
    reply = results[0].reply  # type: ignore[index]
    assert reply.startswith("554 5.6.3 ")
    assert reply.endswith("cannot be converted to 7 bit: the subject header field of the message has 8-bit octets,"
                          " which only SMTPUTF8 can carry")
    assert "MAIL" not in server.verbs()


def test_smtputf8_message_keeps_8bit_header() -> None:
    # A next hop that offers SMTPUTF8 without 8BITMIME gets the UTF-8 header as it is and the body converted.
    server = ScriptedServer({"EHLO": b"250-mx.example.net\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"})
    body = b"Subject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nth\xc3\xa9\r\n"
    outgoing = dataclasses.replace(message("a@example.net", body=body, body_type="8BITMIME"), smtputf8=True)
    results = run_session(server, lambda session: session.send(outgoing))
    assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]
    assert server.lines[1] == b"MAIL FROM:<sender@example.com> SMTPUTF8\r\n"
    assert server.data.startswith(b"Subject: caf\xc3\xa9\r\n")
    assert server.data.endswith(b"\r\n\r\nth=C3=A9\r\n")


def test_size_limit_applies_to_converted_size() -> None:
    # Base64 makes the attachment a third larger: the converted size passes the
    # next hop's limit although the message as spooled is under it.
    attachment = bytes(range(128, 256)) * 8
    body = (b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + attachment + b"\r\n")
    limit = len(body) + 100
    server = ScriptedServer({"EHLO": f"250-mx.example.net\r\n250 SIZE {limit}\r\n".encode()})
    results = run_session(server, lambda session: session.send(message("a@example.net", body=body)))
    assert [r.outcome for r in results] == [Outcome.FAILED]  # type: ignore[attr-defined]
    assert results[0].reply.startswith("552 5.3.4 message size ")  # type: ignore[index]
    assert results[0].downgraded  # type: ignore[index]
    assert "MAIL" not in server.verbs()


def legacy_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Return a server context that speaks only TLS 1.0, as an old MX host or smart host does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1
    # OpenSSL 3 negotiates TLS 1.0 only at security level 0, with SHA-1 suites.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize(
    ("tls", "floors", "outcome"),
    [
        # The defaults: opportunistic TLS accepts TLS 1.0 rather than falling back to plaintext.
        ("opportunistic", {}, "tls"),
        ("opportunistic", {"tls_min_version": "TLSv1.2"}, "plaintext"),
        # A verified smart host must speak TLS 1.2 unless the operator lowers the mandatory floor.
        ("required", {}, "deferred"),
        ("required", {"tls_mandatory_min_version": "TLSv1"}, "tls"),
    ],
)
def test_tls_floor_with_tls_1_0_next_hop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tls: str, floors: dict[str, str], outcome: str
) -> None:
    cert, key = make_certificate(tmp_path)
    port = free_port()
    route = Route(kind="smtp", destination="d", host="127.0.0.1", port=port, use_mx=False, tls=tls)

    async def main() -> object:
        resolver = MXResolver((("127.0.0.1", 9),))
        pool = SessionPool(resolver, "relay.example.test", OPTIONS.timeouts, ca_file=str(cert), **floors)
        session = await pool.acquire(route)
        result = await session.send(message("a@example.net"))
        await session.close()
        return result

    with run_upstream("127.0.0.1", port, tls_context=legacy_server_context(cert, key)) as upstream:
        if outcome == "deferred":
            with pytest.raises(SessionError) as raised:
                asyncio.run(main())
            assert raised.value.reply.startswith("451 4.7.5 TLS handshake with ")
            assert raised.value.temporary
        else:
            results = asyncio.run(main())
            assert [r.outcome for r in results] == [Outcome.DELIVERED]  # type: ignore[attr-defined]

    expected_tls = {"tls": [True], "plaintext": [False], "deferred": []}[outcome]
    assert [m.tls for m in upstream.messages] == expected_tls
    assert ("tls_fallback" in caplog.text) == (outcome == "plaintext")
