"""Drive a sans-IO ``Session`` through a transcript, the way the protocol would.

A transcript is a list of steps: the bytes one client write sends, and the
replies expected in answer.  ``run_transcript`` feeds the steps three ways
(each step whole, every byte alone, and with an incomplete trailing command
after the last step) and checks that the replies and stored messages agree.
Events that make the session wait are answered here: messages are "stored"
with queue IDs Q1, Q2, ..., credentials are checked against ``PASSWORDS``, and
STARTTLS completes at once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.config import Config, ListenerConfig, LocalConfig, PolicyConfig, ServerConfig, load_config
from relay.smtp import replies
from relay.smtp.policy import RelayPolicy
from relay.smtp.session import Session, SessionSettings
from relay.smtp.transaction import CheckCredentials, Close, MessageReady, StartTLS

PASSWORDS = {"user": "pass"}
UNTRUSTED = "192.0.2.10"
TRUSTED = "127.0.0.1"

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")


def hostile_config(**policy: object) -> Config:
    """The setup HOSTILE.md assumes: example.net is local (user rcpt), SIZE 10 MiB."""
    base = load_config(None)
    settings: dict[str, object] = {"local_domains": ("example.net",), "max_message_size": 10 * 1024 * 1024}
    settings.update(policy)
    return base.replace(
        server=dataclasses.replace(base.server, hostname="mx.example.test"),
        policy=dataclasses.replace(PolicyConfig(), **settings),  # type: ignore[arg-type]
        local=dataclasses.replace(LocalConfig(), maildir_root="", users=("rcpt",)),
    )


def make_session(
    config: Config | None = None,
    *,
    client: str = TRUSTED,
    role: str = "mx",
    starttls: bool = True,
    auth: bool = True,
    auth_plaintext: bool = False,
    implicit_tls: bool = False,
    max_errors: int | None = None,
) -> Session:
    config = config or hostile_config()
    if max_errors is not None:
        config = config.replace(server=dataclasses.replace(config.server, max_errors=max_errors))
    listener = ListenerConfig(
        role=role, tls="implicit" if implicit_tls else "starttls", auth_plaintext=auth_plaintext
    )
    settings = SessionSettings.from_config(config, listener, tls_ready=starttls or implicit_tls, auth_ready=auth)
    session = Session(settings, RelayPolicy(config), client)
    return session


@dataclass
class Outcome:
    """What one run produced: every reply, the stored messages, whether it closed."""

    replies: list[str] = field(default_factory=list)
    messages: list[MessageReady] = field(default_factory=list)
    closed: bool = False
    raw: bytes = b""


def split_replies(data: bytes) -> list[str]:
    """Split reply bytes into one string per complete reply (multi-line joined by |)."""
    result: list[str] = []
    current: list[str] = []
    for line in data.split(b"\r\n")[:-1]:
        match = _REPLY_LINE.match(line)
        assert match is not None, f"malformed reply line {line!r}"
        current.append(line.decode("utf-8"))
        if match.group(2) == b" ":
            result.append("|".join(current))
            current = []
    assert not current, f"unterminated multi-line reply {current!r}"
    assert data.endswith(b"\r\n") or data == b"", f"reply bytes end mid-line: {data[-20:]!r}"
    return result


def _answer(session: Session, outcome: Outcome) -> None:
    while True:
        outcome.raw += session.data_to_send()
        events = session.events()
        if not events:
            if session.output_full:
                session.resume_input()
                continue
            return
        for event in events:
            if isinstance(event, MessageReady):
                outcome.messages.append(event)
                session.message_stored(replies.queued(f"Q{len(outcome.messages)}"))
            elif isinstance(event, CheckCredentials):
                ok = PASSWORDS.get(event.user) == event.password
                session.credentials_checked(event.user if ok else None)
            elif isinstance(event, StartTLS):
                session.tls_started()
            elif isinstance(event, Close):
                outcome.closed = True


def feed(session: Session, chunks: list[bytes]) -> Outcome:
    """Start a session and feed it chunks, answering events; return what happened."""
    outcome = Outcome()
    session.start()
    _answer(session, outcome)
    for chunk in chunks:
        session.receive_data(chunk)
        _answer(session, outcome)
    outcome.replies = split_replies(outcome.raw)
    return outcome


Step = tuple[bytes, list[str]]


def run_transcript(factory: Callable[[], Session], steps: list[Step]) -> Outcome:
    """Feed steps whole, byte by byte and with trailing bytes; check each against expectations.

    A session from a trusted client is also fed the whole transcript in one
    chunk, unless it has a STARTTLS (whose pipelined followers are dropped)
    or a step that may refuse DATA; untrusted clients may not send message
    text before the 354.
    """
    data = [step[0] for step in steps]
    expected = ["220"] + [reply for step in steps for reply in step[1]]
    whole = feed(factory(), data)
    bytewise = feed(factory(), [bytes([b]) for b in b"".join(data)])
    trailing = feed(factory(), [*data, b"NOOP"])
    runs = [("whole", whole), ("bytewise", bytewise), ("trailing", trailing)]
    # Text pipelined after a refused DATA closes the session, so a transcript
    # that may refuse DATA is not fed in one chunk either.
    refuses_data = any(b"DATA" in step[0].upper() and any(r[:1] in ("4", "5") for r in step[1]) for step in steps)
    if factory().privileged and not refuses_data and not any(step[0].upper().startswith(b"STARTTLS") for step in steps):
        runs.append(("one chunk", feed(factory(), [b"".join(data)])))
    for name, outcome in runs:
        assert len(outcome.replies) == len(expected), f"{name}: replies {outcome.replies}, expected {expected}"
        for got, want in zip(outcome.replies, expected, strict=True):
            assert got.startswith(want), f"{name}: reply {got!r}, expected {want!r}; all: {outcome.replies}"
        assert [m.body for m in outcome.messages] == [m.body for m in whole.messages], name
        assert outcome.closed == whole.closed, name
    return whole


__all__ = [
    "PASSWORDS",
    "TRUSTED",
    "UNTRUSTED",
    "Outcome",
    "ServerConfig",
    "feed",
    "hostile_config",
    "make_session",
    "run_transcript",
    "split_replies",
]
