"""Shared pieces of the spool tests: envelopes, bodies and event-loop runners.

Child processes of the crash, concurrency and full-disk tests import this
module too, so it depends on nothing from pytest.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from relay.spool import Envelope, Recipient

T = TypeVar("T")

REPOSITORY = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

LOOP_KINDS = ("asyncio", "uvloop")


def run(coroutine: Coroutine[Any, Any, T], loop_kind: str = "asyncio") -> T:
    """Run a coroutine to completion on a fresh asyncio or uvloop event loop."""
    if loop_kind == "uvloop":
        import uvloop

        result: T = uvloop.run(coroutine)
        return result
    return asyncio.run(coroutine)


def make_envelope(sender: str = "sender@example.test", recipients: int = 2, **fields: Any) -> Envelope:
    """Return an envelope with ``recipients`` forward-paths at two domains."""
    paths = tuple(
        Recipient(f"user{index}@{'one' if index % 2 == 0 else 'two'}.example.test")
        for index in range(recipients)
    )
    return Envelope(sender=sender, recipients=paths, **fields)


def make_body(seed: str, size: int) -> bytes:
    """Return a deterministic message of about ``size`` octets derived from ``seed``.

    The body has a header block and CRLF lines; the parent of a crash test
    rebuilds it from the seed to compare byte for byte.
    """
    header = f"Subject: {seed}\r\nMessage-ID: <{seed}@example.test>\r\n\r\n".encode()
    line = hashlib.sha256(seed.encode()).hexdigest().encode() + b"\r\n"
    repeats = max(1, (size - len(header)) // len(line))
    return header + line * repeats


def child_environment() -> dict[str, str]:
    """Return an environment in which a child Python finds relay and this module."""
    environment = dict(os.environ)
    paths = [str(REPOSITORY), str(TESTS)]
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


PYTHON = sys.executable

