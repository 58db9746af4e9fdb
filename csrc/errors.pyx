"""The one error type of the compiled SMTP core.

Every parse failure in the core, on either side of a connection, raises
``SMTPError`` carrying the reply to act on: a three-digit reply code
(RFC 5321 section 4.2), an enhanced status code (RFC 3463, announced with
ENHANCEDSTATUSCODES, RFC 2034) and a short text.  The server sends
``error.reply()`` to the client as is.  The outbound client treats the code
as the outcome of the delivery attempt.

The text is fixed by the core and never contains peer input, so it is safe
to send and to log.
"""


class SMTPError(Exception):
    """A protocol error and the SMTP reply to send for it."""

    def __init__(self, code, enhanced, text):
        if not 400 <= code <= 599:
            raise ValueError(f"SMTPError code must be 4xx or 5xx, got {code!r}")
        if enhanced[:1] != str(code)[0]:
            raise ValueError(
                f"enhanced status {enhanced!r} is not in the class of reply code {code}"
            )
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def permanent(self):
        """True for a 5xx reply, False for a 4xx one."""
        return self.code >= 500

    def reply(self):
        """Return the reply line, CRLF included, as bytes."""
        return f"{self.code} {self.enhanced} {self.text}\r\n".encode("ascii")

    def __str__(self):
        return f"{self.code} {self.enhanced} {self.text}"
