"""Helpers that compare MIME messages by their decoded content."""

from __future__ import annotations

import email
import email.policy


def decoded_leaves(raw: bytes) -> list[tuple[str, bytes]]:
    """Return each entity's content type and decoded content, with line ends as LF; b"" for a multipart.

    A message/rfc822 entity counts as a multipart whose one part is the enclosed message.
    """
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    found: list[tuple[str, bytes]] = []
    for part in message.walk():
        if part.is_multipart():
            found.append((part.get_content_type(), b""))
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found.append((part.get_content_type(), payload.replace(b"\r\n", b"\n")))
    return found
