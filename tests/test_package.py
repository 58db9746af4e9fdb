"""Packaging checks: the import error without the extension, and log line formats."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import orjson

from conftest import REPO_ROOT
from relay.log import MAX_VALUE_LENGTH, WRITE_DELAY, collect_lines, flush_log, log_event, setup_logging


def test_import_without_extension_says_how_to_build(tmp_path: Path) -> None:
    package = tmp_path / "relay"
    package.mkdir()
    for source in (REPO_ROOT / "relay").glob("*.py"):
        shutil.copy(source, package / source.name)

    # -S skips site-packages, whose editable-install hook would find the
    # extension in the source tree; the copy is then the only relay.
    result = subprocess.run(
        [sys.executable, "-S", "-c", "import relay"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode != 0
    assert "relay._buffer" in result.stderr
    assert "pip install ." in result.stderr
    assert "build_ext --inplace" in result.stderr
    assert "circular import" not in result.stderr


def test_text_log_line_escapes_peer_text() -> None:
    stream = io.StringIO()
    setup_logging("text", "info", stream)
    logger = logging.getLogger("relay.test")

    log_event(logger, "rejected", queue_id="ABC123", reply="550 5.1.1 no\r\nINJECTED", count=3)

    line = stream.getvalue()
    assert line.count("\n") == 1
    assert " relay.test: rejected queue_id=ABC123 " in line
    assert 'reply="550 5.1.1 no\\r\\nINJECTED"' in line
    assert line.rstrip().endswith("count=3")


def test_log_escapes_unicode_line_breaks() -> None:
    # An SMTPUTF8 address may carry characters that end a line or reorder
    # text for Unicode-aware readers; the log shows them as escapes.
    stream = io.StringIO()
    setup_logging("text", "info", stream)
    logger = logging.getLogger("relay.test")

    log_event(logger, "reject", command="RCPT TO:<a\u2028b\x85c\u202ed\U000e0001é@example.net>")

    line = stream.getvalue()
    assert len(line.splitlines()) == 1
    assert "a\\u2028b\\x85c\\u202ed\\U000e0001é@example.net" in line


def test_json_log_line_is_one_object() -> None:
    stream = io.StringIO()
    setup_logging("json", "info", stream)
    logger = logging.getLogger("relay.test")

    log_event(logger, "received", queue_id="ABC123", size=1024, client="127.0.0.1")

    document = orjson.loads(stream.getvalue())
    assert document["event"] == "received"
    assert document["queue_id"] == "ABC123"
    assert document["size"] == 1024
    assert document["level"] == "info"


def test_log_line_same_with_extra_handler() -> None:
    # log_event writes directly to setup_logging's handler unless another
    # handler is attached; both paths must produce the same line.
    stream = io.StringIO()
    setup_logging("text", "info", stream)
    logger = logging.getLogger("relay.test")
    captured: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    extra = Capture()

    log_event(logger, "queued", queue_id="ABC123", size=1024, client="127.0.0.1", tls=False)
    logger.addHandler(extra)
    try:
        log_event(logger, "queued", queue_id="ABC123", size=1024, client="127.0.0.1", tls=False)
    finally:
        logger.removeHandler(extra)

    direct, via_record = stream.getvalue().splitlines()
    assert len(captured) == 1
    assert direct.split(" ", 1)[1] == via_record.split(" ", 1)[1]
    assert direct.endswith("relay.test: queued queue_id=ABC123 size=1024 client=127.0.0.1 tls=false")


def test_hostile_values_same_on_both_paths() -> None:
    # log_event writes to the handler directly unless another handler is attached,
    # and through a LogRecord otherwise.  Both routes must write each value the same.
    values = [
        "", "two words", 'say "hi"', "key=value", "bell\a\x1b[31m", "back\\slash", "naïve ü",
        "x" * 600, "é" * 600, b"raw\xffbytes", ["a", "b c"], None, 0.5, 7, True, ValueError("no\nline"),
    ]
    stream = io.StringIO()
    setup_logging("text", "info", stream)
    logger = logging.getLogger("relay.test")
    extra = logging.NullHandler()

    for value in values:
        log_event(logger, "checked", value=value)
        logger.addHandler(extra)
        try:
            log_event(logger, "checked", value=value)
        finally:
            logger.removeHandler(extra)

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 * len(values)
    for direct, via_record in zip(lines[::2], lines[1::2], strict=True):
        assert direct.split(" ", 1)[1] == via_record.split(" ", 1)[1]
    assert 'value="two words"' in lines[2]
    assert "value=bell\\x07\\x1b[31m" in lines[8]


def test_log_truncates_long_values() -> None:
    stream = io.StringIO()
    setup_logging("json", "info", stream)

    log_event(logging.getLogger("relay.test"), "rejected", helo="a" * 5000)

    document = orjson.loads(stream.getvalue())
    assert len(document["helo"]) < 600
    assert document["helo"].endswith("...")


def test_log_bounds_escaped_values() -> None:
    # Each escape is longer than the character it stands for, so the limit
    # applies to the escaped text, and an escape is never cut in two.
    stream = io.StringIO()
    setup_logging("json", "info", stream)
    logger = logging.getLogger("relay.test")
    values = {
        "controls": "\x01" * 600,
        "line_separators": "\u2028" * 600,
        "tags": "\U000e0001" * 600,
        "backslashes": "\\" * 300,
        "last_escape": "a" * 510 + "\x01",
    }

    for name, value in values.items():
        log_event(logger, "checked", **{name: value})

    documents = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    logged = {name: document[name] for document, name in zip(documents, values, strict=True)}
    for name, text in logged.items():
        assert len(text) <= MAX_VALUE_LENGTH + len("..."), name
        assert text.endswith("..."), name
    assert logged["controls"] == "\\x01" * 128 + "..."
    assert logged["line_separators"] == "\\u2028" * 85 + "..."
    assert logged["tags"] == "\\U000e0001" * 51 + "..."
    assert logged["backslashes"] == "\\" * 512 + "..."
    assert logged["last_escape"] == "a" * 510 + "..."


def test_log_bounds_long_lists() -> None:
    stream = io.StringIO()
    setup_logging("json", "info", stream)
    logger = logging.getLogger("relay.test")
    addresses = [f"user{number}@remote.test" for number in range(1000)]

    log_event(logger, "forwarded", recipients=addresses)
    log_event(logger, "forwarded", recipients=addresses[:3])
    setup_logging("text", "info", stream)
    log_event(logger, "forwarded", recipients=addresses)

    long_list, short_list, text_line = stream.getvalue().splitlines()
    logged = orjson.loads(long_list)["recipients"]
    assert logged[-1] == "..."
    assert logged[:-1] == addresses[: len(logged) - 1]
    assert len(",".join(logged)) <= MAX_VALUE_LENGTH + len(",...")
    assert orjson.loads(short_list)["recipients"] == addresses[:3]
    assert text_line.endswith(",...")
    assert len(text_line) < 2 * MAX_VALUE_LENGTH


def test_log_keeps_end_of_traceback() -> None:
    # The error and the innermost frames come last in a traceback, and its
    # line breaks make the escaped text longer than the original.
    stream = io.StringIO()
    setup_logging("json", "info", stream)
    logger = logging.getLogger("relay.test")

    try:
        raise ValueError("\n".join(["line"] * 200) + "\nthe last words")
    except ValueError:
        logger.exception("failed")

    text = orjson.loads(stream.getvalue())["exception"]
    assert len(text) <= MAX_VALUE_LENGTH + len("...")
    assert text.startswith("...")
    assert text.endswith("line\\nthe last words")


def test_sdist_carries_cython_sources(tmp_path: Path) -> None:
    # Without the .pyx files an install from the sdist would build a wheel
    # with no compiled core; generated C must stay out of it.
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    [archive] = tmp_path.glob("relay-*.tar.gz")
    with tarfile.open(archive) as sdist:
        names = sdist.getnames()
    sources = {Path(name).name for name in names if "/csrc/" in name}
    assert {"buffer.pyx", "parser.pyx", "reply.pyx", "stuffing.pyx"} <= sources
    assert not [name for name in names if name.endswith((".c", ".so"))]


class CountingStream(io.StringIO):
    """A text stream that counts its write calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def capture_events() -> tuple[CountingStream, logging.Logger]:
    """Route relay's event log to a new CountingStream; return it and a test logger."""
    stream = CountingStream()
    setup_logging("text", "info", stream)
    return stream, logging.getLogger("relay.test")


def test_loop_log_lines_share_write() -> None:
    stream, logger = capture_events()

    async def log_three() -> str:
        for number in range(3):
            log_event(logger, "queued", queue_id=f"ID{number}")
        written_at_once = stream.getvalue()
        await asyncio.sleep(WRITE_DELAY * 5)
        return written_at_once

    before = asyncio.run(log_three())

    assert before == ""
    assert stream.writes == 1
    assert [line.split()[-1] for line in stream.getvalue().splitlines()] == [
        "queue_id=ID0", "queue_id=ID1", "queue_id=ID2",
    ]


def test_log_line_from_thread_follows_pending_lines() -> None:
    stream, logger = capture_events()

    async def log_from_loop_then_thread() -> None:
        log_event(logger, "queued", queue_id="FIRST")
        # A thread without a loop writes at once, after what the loop collected.
        await asyncio.to_thread(log_event, logger, "committed", queue_id="SECOND")

    asyncio.run(log_from_loop_then_thread())

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("queue_id=FIRST")
    assert lines[1].endswith("queue_id=SECOND")


def test_thread_collected_lines_share_write() -> None:
    stream, logger = capture_events()

    def log_three() -> str:
        with collect_lines():
            for number in range(3):
                log_event(logger, "removed", queue_id=f"ID{number}")
            return stream.getvalue()

    written_inside = log_three()
    log_event(logger, "removed", queue_id="AFTER")

    assert written_inside == ""
    assert stream.writes == 2
    assert [line.split()[-1] for line in stream.getvalue().splitlines()] == [
        "queue_id=ID0", "queue_id=ID1", "queue_id=ID2", "queue_id=AFTER",
    ]


def log_then_stop_loop(logger: logging.Logger) -> asyncio.AbstractEventLoop:
    """Log one line inside a loop that stops before its scheduled write runs; return the stopped loop."""
    loop = asyncio.new_event_loop()

    async def log_and_stop() -> None:
        log_event(logger, "stopping", signal="SIGTERM")
        loop.stop()

    loop.create_task(log_and_stop())
    loop.run_forever()
    return loop


def test_flush_log_writes_collected_lines() -> None:
    stream, logger = capture_events()

    # Like a process that ends right after logging: flush_log must still write the line.
    loop = log_then_stop_loop(logger)
    written_after_stop = stream.getvalue()
    flush_log()
    loop.close()

    assert written_after_stop == ""
    assert stream.getvalue().rstrip().endswith("signal=SIGTERM")


def test_log_line_after_loop_stopped_writes_pending() -> None:
    stream, logger = capture_events()

    loop = log_then_stop_loop(logger)
    # The loop no longer runs its scheduled write, so this thread writes both lines.
    log_event(logger, "stopped", worker=0)
    loop.close()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("signal=SIGTERM")
    assert lines[1].endswith("worker=0")


def test_new_loop_writes_after_stopped_one() -> None:
    stream, logger = capture_events()

    # The write scheduled on this loop never runs, because the loop stopped first.
    loop = log_then_stop_loop(logger)

    async def log_in_new_loop() -> None:
        log_event(logger, "started", worker=1)
        await asyncio.sleep(WRITE_DELAY * 5)

    asyncio.run(log_in_new_loop())
    loop.close()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("signal=SIGTERM")
    assert lines[1].endswith("worker=1")
