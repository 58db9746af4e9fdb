"""Property: any byte stream fed to a session gives replies, never an exception.

The inputs mix real verbs and arguments with random bytes, so that deep
states (transactions, DATA, BDAT, AUTH exchanges) are reached.  The example
budget comes from RELAY_FUZZ_EXAMPLES (default 300) for long runs.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.smtp_transcript import TRUSTED, UNTRUSTED, feed, make_session, split_replies

EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "300"))

VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"RSET", b"NOOP", b"QUIT",
         b"VRFY", b"EXPN", b"HELP", b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN", b"*"]
ARGUMENTS = [b"", b" client.example.com", b"<a@example.net>", b"<rcpt@example.net>", b"<>", b" 5", b" 0 LAST",
             b" 99999999999999999999999 LAST", b" AHVzZXIAcGFzcw==", b" =", b"<a@b> SIZE=99999999999999999999",
             b"<a@b> BODY=BINARYMIME SMTPUTF8", b"<\"x y\"@example.net> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+2Bb"]
ENDINGS = [b"\r\n", b"\n", b"\r", b""]

line = st.builds(
    lambda verb, argument, junk, ending: verb + argument + junk + ending,
    st.sampled_from(VERBS),
    st.sampled_from(ARGUMENTS),
    st.binary(max_size=8),
    st.sampled_from(ENDINGS),
)
stream = st.lists(st.one_of(line, st.binary(max_size=64), st.just(b".\r\n")), max_size=25)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream, st.integers(min_value=1, max_value=64), st.booleans())
def test_session_never_raises(chunks: list[bytes], cut: int, trusted: bool) -> None:
    data = b"".join(chunks)
    pieces = [data[i : i + cut] for i in range(0, len(data), cut)]
    session = make_session(client=TRUSTED if trusted else UNTRUSTED)

    outcome = feed(session, pieces)

    assert outcome.replies[0].startswith("220 ")
    for reply in outcome.replies:
        assert reply[:3].isdigit()
    assert split_replies(outcome.raw) == outcome.replies
