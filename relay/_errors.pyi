"""The one error type of the compiled SMTP core (see ``csrc/errors.pyx``)."""

class SMTPError(Exception):
    """A protocol error and the SMTP reply to send for it.

    ``code`` is the reply code (4xx or 5xx), ``enhanced`` the RFC 3463 status
    code in the same class (``"5.1.7"``), ``text`` a fixed English text that
    never contains peer input.
    """

    code: int
    enhanced: str
    text: str

    def __init__(self, code: int, enhanced: str, text: str) -> None: ...
    @property
    def permanent(self) -> bool:
        """True for a 5xx reply, False for a 4xx one."""

    def reply(self) -> bytes:
        """Return ``b"<code> <enhanced> <text>\\r\\n"``."""
