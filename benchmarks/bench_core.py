"""Measure the compiled SMTP core against its ceilings and baselines.

Two measurements, each with its comparisons taken in the same run, so the
ratios hold even on a busy machine where the absolute figures do not:

- DATA scanning.  100 KB messages are built by concatenating the messages
  of a corpus folder (``--corpus`` or ``RELAY_CORPUS``: every regular file
  in it, line ends turned into CRLF) and dot-stuffed as a client sends them.
  ``data_scan_bytes_per_s`` feeds each one to ``relay._buffer.SMTPBuffer`` in
  DATA mode, in 64 KiB chunks (cut before timing starts), up to its DataEnd
  event (end-of-data search, unstuffing, size count, bare LF/CR checks).
  ``data_find_ceiling_bytes_per_s`` runs ``bytes.find(b"\\r\\n.\\r\\n")`` over
  the same bytes: the practical ceiling for finding end-of-data.
  ``data_python_bytes_per_s`` is a pure-Python loop that splits on CRLF and
  unstuffs line by line.  Without a corpus folder the messages are made of
  generated text lines, and the ``corpus`` field of the output reports that.
- Command parsing.  A mix of MAIL and RCPT lines with ESMTP parameters goes
  through ``relay._parser.parse_command`` (``parse_commands_per_s``) and
  through the functions aiosmtpd 1.4 uses for the same lines in its read
  loop and ``smtp_MAIL``/``smtp_RCPT`` handlers (``parse_aiosmtpd_commands_per_s``):
  split and decode the line, ``_strip_command_keyword``, ``_getaddr``
  (the standard library's e-mail address parser), ``_getparams`` and the
  SIZE check.

Each measurement runs ``--rounds`` times, alternating with the others, and
the medians are reported.

Usage: ``python benchmarks/bench_core.py [--seconds 1.0] [--rounds 3] [--corpus DIR] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script from a checkout: import relay from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay._buffer import DataEnd, SMTPBuffer  # noqa: E402
from relay._parser import parse_command  # noqa: E402
from relay._stuffing import dot_stuff, normalize_line_ends  # noqa: E402

MESSAGE_SIZE = 100 * 1000
MESSAGE_COUNT = 8
CHUNK_SIZE = 64 * 1024

COMMANDS = [
    b"MAIL FROM:<alice.smith@example.com> SIZE=48213 BODY=8BITMIME",
    b"RCPT TO:<bob@example.net>",
    b"RCPT TO:<carol.jones@mail.example.org> NOTIFY=SUCCESS,FAILURE",
    b"RCPT TO:<dave+tag@example.net> NOTIFY=FAILURE ORCPT=rfc822;dave+2Btag@example.net",
    b"MAIL FROM:<> SIZE=2048",
    b"RCPT TO:<postmaster@example.com>",
    b"MAIL FROM:<bounces-1234-abcd@lists.example.com> SIZE=104857 RET=HDRS ENVID=QQ314159",
    b"RCPT TO:<eve@sub.example.co.uk>",
    b"MAIL FROM:<noreply@service.example.com> BODY=7BIT",
    b"RCPT TO:<frank_o@example.org> NOTIFY=NEVER",
]


def load_corpus(folder: Path | None) -> tuple[list[bytes], str]:
    if folder is not None:
        files = sorted(path for path in folder.iterdir() if path.is_file())
        messages = [normalize_line_ends(path.read_bytes()) for path in files]
        messages = [message for message in messages if message]
        if messages:
            return messages, f"{len(messages)} files"
    lines = [b"Line %d of generated text, about as long as a line of mail.\r\n" % i
             for i in range(100)]
    lines += [b".a line that starts with a dot\r\n", b"\r\n"]
    return [b"".join(lines)], "generated text"


def build_messages(sources: list[bytes]) -> list[bytes]:
    """Return MESSAGE_COUNT dot-stuffed messages of about MESSAGE_SIZE octets each."""
    messages = []
    for start in range(MESSAGE_COUNT):
        parts: list[bytes] = []
        size = 0
        index = start
        while size < MESSAGE_SIZE:
            source = sources[index % len(sources)]
            parts.append(source if source.endswith(b"\r\n") else source + b"\r\n")
            size += len(parts[-1])
            index += 1
        messages.append(dot_stuff(b"".join(parts)))
    return messages


def rate(work: Callable[[], int], seconds: float) -> float:
    """Run ``work`` (which returns units done) for about ``seconds``; return units/s."""
    work()  # warm up
    done = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        done += work()
        elapsed = time.perf_counter() - start
    return done / elapsed


def split_chunks(wire: bytes) -> list[bytes]:
    """Cut a message into the chunks a socket would deliver, before timing starts."""
    return [wire[start:start + CHUNK_SIZE] for start in range(0, len(wire), CHUNK_SIZE)]


def scan_relay(chunked: list[list[bytes]]) -> int:
    buffer = SMTPBuffer()
    total = 0
    event = None
    for chunks in chunked:
        buffer.start_data(1 << 30)
        for chunk in chunks:
            buffer.feed(chunk)
            event = buffer.next_event()
            total += len(chunk)
        if not isinstance(event, DataEnd):
            raise RuntimeError(f"no end of data: {event!r}")
    return total


def scan_find(messages: list[bytes]) -> int:
    total = 0
    for wire in messages:
        # The message starts at a line start; the search needs the CRLF
        # before the final dot, which the wire form carries.
        if wire.find(b"\r\n.\r\n") < 0:
            raise RuntimeError("no end of data")
        total += len(wire)
    return total


def unstuff_python(wire: bytes) -> bytes:
    lines = []
    for line in wire.split(b"\r\n"):
        if line == b".":
            break
        if line.startswith(b"."):
            line = line[1:]
        lines.append(line)
    return b"\r\n".join(lines) + b"\r\n"


def scan_python(messages: list[bytes]) -> int:
    total = 0
    for wire in messages:
        unstuff_python(wire)
        total += len(wire)
    return total


def parse_relay(lines: list[bytes]) -> int:
    for line in lines:
        parse_command(line)
    return len(lines)


def make_aiosmtpd_parser() -> Callable[[bytes], Any]:
    from aiosmtpd.smtp import SMTP

    class Handler:
        pass

    # Only the parsing methods are called, so no event loop or transport is needed.
    server = SMTP.__new__(SMTP)
    server.local_part_limit = 0
    del Handler

    def parse(line: bytes) -> Any:
        # aiosmtpd's _handle_client: split off the verb, decode both parts.
        line = line.rstrip(b"\r\n")
        command_bytes, _, arg_bytes = line.partition(b" ")
        command = command_bytes.upper().decode("ascii")
        arg = arg_bytes.strip().decode("utf-8", errors="surrogateescape")
        keyword = "FROM:" if command == "MAIL" else "TO:"
        # smtp_MAIL / smtp_RCPT: the path and the parameters.
        stripped = server._strip_command_keyword(keyword, arg)
        address, rest = server._getaddr(stripped)
        options = rest.upper().split()
        params = server._getparams(options)
        size = params.get("SIZE")
        if isinstance(size, str) and size.isdigit():
            int(size)
        return address, params

    return parse


def parse_aiosmtpd(parse: Callable[[bytes], Any], lines: list[bytes]) -> int:
    for line in lines:
        parse(line)
    return len(lines)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for row in cpuinfo:
                if row.startswith("model name"):
                    model = row.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": model or platform.processor(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time per measurement in seconds (default 1.0)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of all measurements; medians are reported"
                             " (default 3)")
    parser.add_argument("--corpus", type=Path, default=os.environ.get("RELAY_CORPUS"),
                        help="folder of messages for the DATA scan (default: $RELAY_CORPUS)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    corpus = args.corpus
    if corpus is not None:
        corpus = Path(corpus)
        if not corpus.is_dir():
            parser.error(f"corpus folder not found: {corpus}")
    sources, corpus_label = load_corpus(corpus)
    messages = build_messages(sources)
    for wire in messages:
        if unstuff_python(wire) != scan_body(wire):
            raise RuntimeError("relay and the Python loop disagree on a message body")

    lines = COMMANDS * 10
    aiosmtpd_parse = make_aiosmtpd_parser()

    chunked = [split_chunks(wire) for wire in messages]
    workloads: dict[str, Callable[[], int]] = {
        "data_scan": lambda: scan_relay(chunked),
        "data_find": lambda: scan_find(messages),
        "data_python": lambda: scan_python(messages),
        "parse": lambda: parse_relay(lines),
        "parse_aiosmtpd": lambda: parse_aiosmtpd(aiosmtpd_parse, lines),
    }
    # Rounds alternate the workloads so a change in machine load hits all
    # of them alike; each figure is the median over the rounds.
    samples: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(args.rounds):
        for name, work in workloads.items():
            samples[name].append(rate(work, args.seconds))
    data_scan = statistics.median(samples["data_scan"])
    data_find = statistics.median(samples["data_find"])
    data_python = statistics.median(samples["data_python"])
    parse_rate = statistics.median(samples["parse"])
    parse_aio = statistics.median(samples["parse_aiosmtpd"])

    result = {
        "machine": machine(),
        "corpus": corpus_label,
        "message_octets": sum(len(wire) for wire in messages) // len(messages),
        "messages": len(messages),
        "seconds_per_measurement": args.seconds,
        "rounds": args.rounds,
        "data_scan_bytes_per_s": round(data_scan),
        "data_find_ceiling_bytes_per_s": round(data_find),
        "data_python_bytes_per_s": round(data_python),
        "data_scan_vs_find": round(data_scan / data_find, 3),
        "data_scan_vs_python": round(data_scan / data_python, 2),
        "parse_commands_per_s": round(parse_rate),
        "parse_aiosmtpd_commands_per_s": round(parse_aio),
        "parse_vs_aiosmtpd": round(parse_rate / parse_aio, 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(key) for key in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0


def scan_body(wire: bytes) -> bytes:
    buffer = SMTPBuffer()
    buffer.start_data(1 << 30)
    buffer.feed(wire)
    event = buffer.next_event()
    assert isinstance(event, DataEnd)
    return event.body


if __name__ == "__main__":
    sys.exit(main())
