"""The catalog of every SMTP reply the server sends.

A reply is a code (RFC 5321 section 4.2), an enhanced status code (RFC 3463,
advertised as ENHANCEDSTATUSCODES per RFC 2034) and text.  Every 4xx and 5xx
reply carries an enhanced code whose class digit matches the reply's first
digit; ``tests/test_smtp_session.py`` checks that for the whole catalog.  The
greeting, EHLO/HELO replies, ``334`` challenges and ``354`` carry no enhanced
code, as RFC 2034 section 3 exempts them.

Reply text never contains peer input except where a template inserts an
address or name that the command parser has already validated (no CR, LF or
NUL can reach a reply).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``lines`` holds more than one entry for multi-line replies."""

    code: int
    status: str
    lines: tuple[str, ...]
    # The wire bytes, filled in once for catalog replies, which are sent again and again.
    wire: bytes = field(default=b"", compare=False, repr=False)

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    @property
    def closes(self) -> bool:
        """Whether the server closes the connection after sending this reply."""
        return self.code in (221, 421, 521) or self in _CLOSING

    def encode(self) -> bytes:
        """Return the reply as wire bytes, continuation lines marked with ``-``."""
        if self.wire:
            return self.wire
        prefix = f"{self.status} " if self.status else ""
        last = len(self.lines) - 1
        out = []
        for index, line in enumerate(self.lines):
            separator = " " if index == last else "-"
            # RFC 2034 section 3: the enhanced code starts every line of the reply.
            text = f"{prefix}{line}" if line or prefix else ""
            out.append(f"{self.code}{separator}{text}".rstrip(" ") + "\r\n")
        if self.code == 334 and self.lines == ("",):
            # RFC 4954 section 4: an empty challenge is "334 " with the space.
            return b"334 \r\n"
        return "".join(out).encode("utf-8")


CATALOG: dict[str, Reply] = {}


def _reply(name: str, code: int, status: str, *lines: str) -> Reply:
    reply = Reply(code, status, lines)
    object.__setattr__(reply, "wire", reply.encode())
    CATALOG[name] = reply
    return reply


# Greeting and connection-level replies.
SERVICE_UNAVAILABLE = _reply("SERVICE_UNAVAILABLE", 421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_CONNECTIONS = _reply("TOO_MANY_CONNECTIONS", 421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_CLIENT = _reply(
    "TOO_MANY_FROM_CLIENT", 421, "4.7.0", "Too many connections from your address, try again later"
)
TOO_MANY_ERRORS = _reply("TOO_MANY_ERRORS", 421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = _reply("TIMEOUT", 421, "4.4.2", "Timeout exceeded, closing connection")
BYE = _reply("BYE", 221, "2.0.0", "Bye")
# The greeting of `relay sendmail -bs` when its config or spool cannot be used.
LOCAL_SUBMISSION_UNAVAILABLE = _reply(
    "LOCAL_SUBMISSION_UNAVAILABLE", 421, "4.3.0", "Local mail submission unavailable, try again later"
)

# Generic success.
OK = _reply("OK", 250, "2.0.0", "OK")
SENDER_OK = _reply("SENDER_OK", 250, "2.1.0", "Sender OK")
RECIPIENT_OK = _reply("RECIPIENT_OK", 250, "2.1.5", "Recipient OK")
RESET_OK = _reply("RESET_OK", 250, "2.0.0", "Reset OK")
START_DATA = _reply("START_DATA", 354, "", "End data with <CR><LF>.<CR><LF>")
READY_TLS = _reply("READY_TLS", 220, "2.0.0", "Ready to start TLS")
CANNOT_VERIFY = _reply(
    "CANNOT_VERIFY", 252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"
)
# The commands every session accepts; HELP adds STARTTLS and AUTH where offered.
HELP_COMMANDS = ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "HELP")


def help_reply(extra: tuple[str, ...] = ()) -> Reply:
    """Return the HELP reply listing the commands the session accepts."""
    return Reply(214, "2.0.0", ("Commands: " + " ".join(HELP_COMMANDS + extra), "See RFC 5321 for their use"))

AUTH_OK = _reply("AUTH_OK", 235, "2.7.0", "Authentication successful")
CHUNK_OK = _reply("CHUNK_OK", 250, "2.0.0", "Chunk received")

# Syntax errors (RFC 3463 class X.5.X: protocol or syntax).
LINE_TOO_LONG = _reply("LINE_TOO_LONG", 500, "5.5.2", "Line too long")
UNKNOWN_COMMAND = _reply("UNKNOWN_COMMAND", 500, "5.5.1", "Command not recognized")
SYNTAX_ERROR = _reply("SYNTAX_ERROR", 501, "5.5.4", "Syntax error in parameters or arguments")
HELO_REQUIRES_DOMAIN = _reply("HELO_REQUIRES_DOMAIN", 501, "5.5.4", "Domain name required")
INVALID_HELO = _reply("INVALID_HELO", 501, "5.5.4", "Invalid domain name")
NO_ARGUMENTS_ALLOWED = _reply("NO_ARGUMENTS_ALLOWED", 501, "5.5.4", "No arguments allowed")
BAD_SENDER_SYNTAX = _reply("BAD_SENDER_SYNTAX", 501, "5.1.7", "Invalid sender address syntax")
BAD_RECIPIENT_SYNTAX = _reply("BAD_RECIPIENT_SYNTAX", 501, "5.1.3", "Invalid recipient address syntax")
BAD_PARAMETER = _reply("BAD_PARAMETER", 501, "5.5.4", "Invalid or repeated parameter")
UNKNOWN_PARAMETER = _reply("UNKNOWN_PARAMETER", 555, "5.5.4", "Parameter not recognized or not implemented")
NOT_IMPLEMENTED = _reply("NOT_IMPLEMENTED", 502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = _reply("BAD_SEQUENCE", 503, "5.5.1", "Bad sequence of commands")
GREET_FIRST = _reply("GREET_FIRST", 503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = _reply("NESTED_MAIL", 503, "5.5.1", "Sender already given")
NEED_MAIL = _reply("NEED_MAIL", 503, "5.5.1", "Need MAIL command first")
NEED_RCPT = _reply("NEED_RCPT", 503, "5.5.1", "Need RCPT command first")
TLS_ALREADY_ACTIVE = _reply("TLS_ALREADY_ACTIVE", 503, "5.5.1", "TLS already active")
ALREADY_AUTHENTICATED = _reply("ALREADY_AUTHENTICATED", 503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = _reply("AUTH_IN_TRANSACTION", 503, "5.5.1", "AUTH not allowed during a mail transaction")
BDAT_AFTER_DATA_MIXED = _reply("BDAT_AFTER_DATA_MIXED", 503, "5.5.1", "DATA not allowed after BDAT")
RCPT_AFTER_BDAT = _reply("RCPT_AFTER_BDAT", 503, "5.5.1", "RCPT not allowed after BDAT")
BAD_BDAT_SYNTAX = _reply(
    "BAD_BDAT_SYNTAX", 501, "5.5.4", "Invalid BDAT command, closing connection. Usage: BDAT size [LAST]"
)
NON_ASCII_ADDRESS = _reply(
    "NON_ASCII_ADDRESS", 553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter"
)
INVALID_UTF8 = _reply("INVALID_UTF8", 553, "5.6.7", "Address is not valid UTF-8")
PIPELINING_VIOLATION = _reply(
    "PIPELINING_VIOLATION", 554, "5.5.0", "Protocol synchronization error, closing connection"
)
BARE_LINE_END = _reply("BARE_LINE_END", 521, "5.5.2", "Bare CR or LF in message data, closing connection")
BAD_COMMAND_LINE_END = _reply("BAD_COMMAND_LINE_END", 501, "5.5.2", "Bare CR in command line")
PARAMETERS_NEED_EHLO = _reply(
    "PARAMETERS_NEED_EHLO", 555, "5.5.4", "MAIL and RCPT parameters are not accepted after HELO, use EHLO"
)
BDAT_NEEDS_EHLO = _reply("BDAT_NEEDS_EHLO", 503, "5.5.1", "BDAT is not accepted after HELO, use EHLO")
BODY_NOT_SUPPORTED = _reply("BODY_NOT_SUPPORTED", 555, "5.5.4", "BODY value not supported")

# Policy.
TLS_REQUIRED = _reply("TLS_REQUIRED", 530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = _reply("AUTH_REQUIRED", 530, "5.7.0", "Authentication required")
AUTH_NOT_AVAILABLE = _reply("AUTH_NOT_AVAILABLE", 502, "5.5.1", "AUTH not available")
AUTH_UNKNOWN_MECHANISM = _reply("AUTH_UNKNOWN_MECHANISM", 504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_CANCELLED = _reply("AUTH_CANCELLED", 501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = _reply("AUTH_BAD_BASE64", 501, "5.5.2", "Invalid base64 data")
AUTH_FAILED = _reply("AUTH_FAILED", 535, "5.7.8", "Authentication credentials invalid")
AUTH_LINE_TOO_LONG = _reply("AUTH_LINE_TOO_LONG", 500, "5.5.6", "Authentication exchange line too long")
AUTH_TEMPORARY_FAILURE = _reply("AUTH_TEMPORARY_FAILURE", 454, "4.7.0", "Temporary authentication failure")
RELAY_DENIED = _reply("RELAY_DENIED", 554, "5.7.1", "Relay access denied")
NO_SUCH_USER = _reply("NO_SUCH_USER", 550, "5.1.1", "No such user here")
ADDRESS_LITERAL_DENIED = _reply("ADDRESS_LITERAL_DENIED", 550, "5.7.1", "Address literal not accepted")
TOO_MANY_RECIPIENTS = _reply("TOO_MANY_RECIPIENTS", 452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = _reply("MESSAGE_TOO_BIG", 552, "5.3.4", "Message size exceeds fixed maximum message size")
BDAT_TOO_BIG = _reply(
    "BDAT_TOO_BIG", 552, "5.3.4", "Message size exceeds fixed maximum message size, closing connection"
)
MAIL_LOOP = _reply("MAIL_LOOP", 554, "5.4.6", "Too many Received headers, mail loop detected")
NO_VALID_RECIPIENTS = _reply("NO_VALID_RECIPIENTS", 554, "5.5.1", "No valid recipients")

# Local failures.
STORAGE_FAILURE = _reply("STORAGE_FAILURE", 452, "4.3.1", "Insufficient system storage, try again later")
LOCAL_ERROR = _reply("LOCAL_ERROR", 451, "4.3.0", "Local error in processing, try again later")

# The server closes the connection after these replies (besides 221/421/521).
_CLOSING = frozenset({PIPELINING_VIOLATION, BDAT_TOO_BIG, BAD_BDAT_SYNTAX})


def queued(queue_id: str) -> Reply:
    """Return the end-of-data reply naming the queue ID the spool assigned."""
    return Reply(250, "2.0.0", (f"Ok: queued as {queue_id}",))


def greeting(hostname: str) -> Reply:
    """Return the 220 greeting (RFC 5321 section 4.3.1)."""
    return Reply(220, "", (f"{hostname} ESMTP relay",))


# Octets in a reply line with its code and CRLF (RFC 5321 section 4.5.3.1.5).
MAX_REPLY_LINE = 512


def _greets(hostname: str, client_name: str) -> str:
    """Return ``HOST greets NAME``, the name cut so that the line fits in MAX_REPLY_LINE octets.

    A hostname of 253 octets, the most the config accepts, leaves room for
    245 octets of the client's name.
    """
    text = f"{hostname} greets "
    room = MAX_REPLY_LINE - len("250-") - len(text.encode()) - len("\r\n")
    return text + client_name.encode()[: max(room, 0)].decode("utf-8", "ignore")


def helo(hostname: str, client_name: str) -> Reply:
    return Reply(250, "", (_greets(hostname, client_name),))


def ehlo(hostname: str, client_name: str, keywords: list[str]) -> Reply:
    """Return the multi-line EHLO reply: the greeting line, then one keyword a line."""
    return Reply(250, "", (_greets(hostname, client_name), *keywords))


def challenge(text: str) -> Reply:
    """Return a 334 SASL challenge; text is already base64 (RFC 4954 section 4)."""
    return Reply(334, "", (text,))
