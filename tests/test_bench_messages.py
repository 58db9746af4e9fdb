"""The messages that relay bench generates: exact sizes after encoding."""

from __future__ import annotations

import pytest

from relay.bench.messages import encode, generate_message


def test_generated_size_exact_for_every_size() -> None:
    # The headers alone, with these addresses, are 224 octets.
    headers = 224
    # 300 octets span more than three filler lines, so the body is cut at every position of a line.
    wrong = [
        size
        for size in range(headers, headers + 300)
        if encode(generate_message(size, "bench0@example.test", "rcpt0@example.test")).octets != size
    ]
    assert wrong == []


def test_size_below_headers_rejected() -> None:
    with pytest.raises(ValueError, match="below the minimum 224"):
        generate_message(223, "bench0@example.test", "rcpt0@example.test")
