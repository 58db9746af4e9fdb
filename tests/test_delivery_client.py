"""The outbound SMTP client against scripted next hops: the outbound cases of the hostile-input catalogue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from conftest import free_port
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

EHLO_PLAIN = b"250-mx.example.net\r\n250 8BITMIME\r\n"
OPTIONS = SessionOptions(helo_name="relay.example.test", tls="none", timeouts=Timeouts(connect=2, greeting=2, helo=2,
                         mail=2, rcpt=2, data_init=2, data_block=2, data_done=2, rset=2))


class ScriptedServer:
    """A next hop that answers each command by its verb and records every line the client sends."""

    def __init__(
        self, replies: dict[str, bytes | list[bytes]], greeting: bytes = b"220 mx.example.net ESMTP\r\n"
    ) -> None:
        # A list answers successive commands with the same verb in turn.
        self.replies: dict[str, bytes | list[bytes]] = {
            "EHLO": EHLO_PLAIN, "MAIL": b"250 ok\r\n", "RCPT": b"250 ok\r\n", "DATA": b"354 go\r\n",
            ".": b"250 queued\r\n", "RSET": b"250 ok\r\n", "QUIT": b"221 bye\r\n", **replies,
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
                planned = self.replies.get(verb, b"500 unknown\r\n")
                reply = planned.pop(0) if isinstance(planned, list) else planned
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


def run_session(server: ScriptedServer, action: Callable[[SMTPSession], object]) -> object:
    async def main() -> object:
        port = free_port()
        listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
        try:
            session = await SMTPSession.open("mx.example.net", "127.0.0.1", port, OPTIONS)
            try:
                return await action(session)  # type: ignore[misc]
            finally:
                await session.close()
        finally:
            listener.close()

    return asyncio.run(main())


def message(*recipients: str, body: bytes = b"Subject: t\r\n\r\nx\r\n", orcpt: str | None = None) -> OutboundMessage:
    return OutboundMessage(
        queue_id="Q",
        sender="sender@example.com",
        recipients=tuple(OutboundRecipient(i, a, orcpt=orcpt) for i, a in enumerate(recipients)),
        body=body,
    )


@pytest.mark.parametrize("reply", [b"250-a\r\n251 b\r\n", b"25\r\n", b"2500 ok\r\n",
                                   b"250-" + b"x" * 600 + b"\r\n250 ok\r\n", b"250-x\r\n" * 12000])
def test_malformed_reply_ends_session_temporarily(reply: bytes) -> None:
    server = ScriptedServer({"MAIL": reply})
    with pytest.raises(SessionError) as caught:
        run_session(server, lambda session: session.send(message("a@example.net")))
    assert caught.value.temporary
    assert "DATA" not in server.verbs()


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


def test_refusing_greeting_gets_only_quit() -> None:
    server = ScriptedServer({}, greeting=b"554 5.7.1 not allowed\r\n")
    with pytest.raises(SessionError) as caught:
        run_session(server, lambda session: session.send(message("a@example.net")))
    assert not caught.value.temporary
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
