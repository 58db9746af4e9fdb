"""Structured event logging: one line per event, in ``text`` or ``json`` form.

Every module logs through ``log_event(logger, "event", key=value, ...)``.  The
text form is ``TIME LEVEL logger: event key=value ...`` like Postfix's
``queue-id: key=value`` lines; the json form is one orjson object per line
with the same fields.  Control characters in values from peers are
escaped, and the escaped text is cut to ``MAX_VALUE_LENGTH`` characters,
so a hostile client cannot forge or flood log lines.  Callers never pass secrets
(passwords, AUTH responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import orjson

_get_running_loop = asyncio.events._get_running_loop

# Long enough for an SMTP reply line (512 octets), short enough to keep one
# hostile client from filling the log.
MAX_VALUE_LENGTH = 512

_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {0x7F: "\\x7f", ord("\\"): "\\\\"}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


_PLAIN_TYPES = frozenset({int, bool, type(None)})


def clean(value: Any) -> Any:
    """Return value made safe for one log line: text escaped and truncated."""
    if type(value) is str and len(value) <= MAX_VALUE_LENGTH and value.isascii():
        # The common case: printable ASCII without a backslash needs no escape.
        if value.isprintable() and "\\" not in value:
            return value
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        shortened = len(value) > MAX_VALUE_LENGTH
        if shortened:
            value = value[:MAX_VALUE_LENGTH]
        escaped = value.translate(_ESCAPES)
        if not escaped.isprintable():
            escaped = _escape_unprintable(escaped)
        if len(escaped) > MAX_VALUE_LENGTH:
            # An escape is up to ten characters long, so a hostile value of control
            # characters would otherwise give a line several times the size it cost.
            escaped = _escaped_prefix(value)
            shortened = True
        return escaped + "..." if shortened else escaped
    if isinstance(value, (list, tuple)):
        return _clean_items(value)
    if value is None or isinstance(value, (int, float)):
        return value
    # Any other object (an exception, a path) is logged as its text, which may contain a line break.
    return clean(str(value))


def _clean_items(items: list[Any] | tuple[Any, ...]) -> list[Any]:
    """Clean each item; once the items pass MAX_VALUE_LENGTH characters in all, end the list with ``...``.

    A list such as the remote addresses of an alias can have a thousand
    items, and systemd 252's journald splits a line longer than 48 KiB
    (its default LineMax) into several records.
    """
    cleaned: list[Any] = []
    length = 0
    for item in items:
        text = clean(item)
        length += len(str(text)) + 1  # with the comma that joins it in the text form
        if cleaned and length > MAX_VALUE_LENGTH + 1:
            cleaned.append("...")
            break
        cleaned.append(text)
    return cleaned


def _escape_unprintable(text: str) -> str:
    """Replace the characters that are not printable with ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``.

    Peer text may be UTF-8 (an SMTPUTF8 address), and some of its characters
    end a line for Unicode-aware readers (NEL U+0085, U+2028, U+2029) or
    reorder the displayed text (bidirectional overrides such as U+202E).
    """
    parts = []
    for character in text:
        if character.isprintable():
            parts.append(character)
            continue
        code = ord(character)
        if code <= 0xFF:
            parts.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            parts.append(f"\\u{code:04x}")
        else:
            parts.append(f"\\U{code:08x}")
    return "".join(parts)


def _escaped_prefix(text: str) -> str:
    """Return the escaped form of the longest start of text that fits in MAX_VALUE_LENGTH, without cutting an escape."""
    parts = []
    length = 0
    for character in text:
        piece = character.translate(_ESCAPES)
        if not piece.isprintable():
            piece = _escape_unprintable(piece)
        length += len(piece)
        if length > MAX_VALUE_LENGTH:
            break
        parts.append(piece)
    return "".join(parts)


def _escaped_end(text: str) -> str:
    """Return the end of text, after ``...`` when cut, short enough that ``clean`` keeps all of it."""
    room = MAX_VALUE_LENGTH - len("...")
    start = len(text)
    while start > 0:
        room -= len(clean(text[start - 1]))
        if room < 0:
            return "..." + text[start:]
        start -= 1
    return text


def _text_value(value: Any) -> str:
    """Clean one field value for the text form, quoted when it contains a space, a quote or ``=``."""
    kind = type(value)
    if kind is str:
        text: str = clean(value)
    elif kind is int:
        return str(value)
    elif kind is bool:
        return "true" if value else "false"
    elif value is None:
        return "-"
    elif isinstance(value, float):
        return f"{value:.3f}"
    else:
        cleaned = clean(value)
        text = ",".join(str(item) for item in cleaned) if isinstance(cleaned, list) else cleaned
    if text and " " not in text and '"' not in text and "=" not in text:
        return text
    return '"' + text.replace('"', '\\"') + '"'


def _timestamp(created: float) -> str:
    """Return ``created`` as UTC ISO 8601 with milliseconds, reusing the text of the last second."""
    global _stamp
    second = int(created)
    cached_second, text = _stamp  # one tuple, so threads never mix two seconds
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp = (second, text)
    return f"{text}.{int((created - second) * 1000):03d}Z"


_stamp = (-1, "")


def _render(json_form: bool, created: float, level: str, name: str, event: str, fields: dict[str, Any]) -> str:
    """Return one log line (without its newline), cleaning the field values."""
    stamp = _timestamp(created)
    if json_form:
        document = {"ts": stamp, "level": level, "logger": name, "event": event}
        # Ints, booleans and None need no cleaning, so they skip the call.
        document.update((key, value if type(value) in _PLAIN_TYPES else clean(value)) for key, value in fields.items())
        return orjson.dumps(document, default=str).decode()
    parts = [stamp, level, name + ":", event]
    # One call per value cleans and quotes it, because this runs for every line a session logs.
    parts += [key + "=" + _text_value(value) for key, value in fields.items()]
    return " ".join(parts)


class _EventFormatter(logging.Formatter):
    def __init__(self, json_form: bool) -> None:
        super().__init__()
        self.json_form = json_form

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None) or "message"
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        if event == "message":
            fields = {"text": record.getMessage(), **fields}
        if record.exc_info:
            # The innermost frames and the error itself come last: keep the end.
            fields = {**fields, "exception": _escaped_end(self.formatException(record.exc_info))}
        return _render(self.json_form, record.created, record.levelname.lower(), record.name, event, fields)


class _EventHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``setup_logging`` installs; ``log_event`` writes through it directly.

    Lines logged on a thread with a running event loop are collected and
    written together ``WRITE_DELAY`` seconds after the first of them: one
    ``write`` for all the events of that time instead of one per line (or
    one per loop iteration, two or three per SMTP session).  A thread
    without a loop gets the same inside a ``collect_lines`` block.  Lines from other
    threads, ``emit`` and ``flush`` write the collected lines first, so the
    output keeps the order in which events were logged.
    """

    def __init__(self, stream: TextIO, json_form: bool) -> None:
        super().__init__(stream)
        self.json_form = json_form
        self.setFormatter(_EventFormatter(json_form))
        self._pending: list[str] = []
        self._write_scheduled = False
        # The loop that writes the collected lines while _write_scheduled is set, and its thread.
        self._scheduled_loop: asyncio.AbstractEventLoop | None = None
        self._scheduled_thread = 0
        self._collecting = threading.local()  # ``active`` is set inside collect_lines

    def write_event(self, level: int, name: str, event: str, fields: dict[str, Any]) -> None:
        """Write one event line without building a LogRecord, as ``emit`` would write it."""
        line = _render(self.json_form, time.time(), _LEVEL_NAMES[level], name, event, fields)
        thread = threading.get_ident()
        self.acquire()
        try:
            self._pending.append(line)
            scheduled = self._scheduled_loop
            if self._write_scheduled and thread == self._scheduled_thread and scheduled and scheduled.is_running():
                # This thread's loop writes the lines when its timer fires.  Checked
                # first because _get_running_loop makes a getpid system call in 3.11.
                return
            if getattr(self._collecting, "active", False):
                return
            loop = _get_running_loop()
            if loop is not None and self._schedule_write(loop, thread):
                return
            self._write_pending()
        except Exception:
            self.handleError(logging.makeLogRecord({"name": name, "levelno": level, "msg": event}))
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        self.acquire()
        try:
            self._write_pending()
        except Exception:
            self.handleError(record)
        finally:
            self.release()
        super().emit(record)

    def flush(self) -> None:
        """Write the collected lines, then flush the stream."""
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def _schedule_write(self, loop: asyncio.AbstractEventLoop, thread: int) -> bool:
        """Arrange for the collected lines to be written by ``loop`` soon; return whether that worked."""
        # A write scheduled on another loop may never run, because that loop may
        # have stopped before its timer fired.  So this loop schedules its own.
        if self._write_scheduled and self._scheduled_loop is loop:
            return True
        try:
            loop.call_later(WRITE_DELAY, self._write_scheduled_lines)
        except RuntimeError:  # the loop is closing
            return False
        self._write_scheduled = True
        self._scheduled_loop = loop
        self._scheduled_thread = thread
        return True

    def _write_scheduled_lines(self) -> None:
        self.acquire()
        try:
            self._write_scheduled = False
            self._scheduled_loop = None
            self._write_pending()
        except Exception:
            self.handleError(logging.makeLogRecord({"name": "relay", "levelno": logging.ERROR, "msg": "log write"}))
        finally:
            self.release()

    def _write_pending(self) -> None:
        # Called with the handler's lock held.
        if self._pending and self.stream is not None:
            text = "\n".join(self._pending) + "\n"
            self._pending.clear()
            self.stream.write(text)
        if self.stream is not None and hasattr(self.stream, "flush"):
            self.stream.flush()


# How long lines logged on an event loop wait to share one write.  A crash
# that ends the process at once (SIGKILL) loses at most this much of the log.
WRITE_DELAY = 0.01

_LEVEL_NAMES = {
    level: logging.getLevelName(level).lower()
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
}
# The handler of the "relay" logger while setup_logging's configuration is in place.
_direct: _EventHandler | None = None
_relay_logger = logging.getLogger("relay")


@contextlib.contextmanager
def collect_lines() -> Iterator[None]:
    """Collect the event lines this thread logs in the block; write them with one ``write`` at its end.

    For threads without an event loop that log several events at a time,
    such as the spool's writer thread.
    """
    handler = _direct
    if handler is None:
        yield
        return
    handler._collecting.active = True
    try:
        yield
    finally:
        handler._collecting.active = False
        handler.flush()


def flush_log() -> None:
    """Write every event line still collected for a later write, then flush stderr.

    Call before ``os._exit``, which skips the ``logging`` shutdown that
    would otherwise do it.
    """
    if _direct is not None:
        _direct.flush()
    sys.stderr.flush()


def setup_logging(form: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Route the ``relay`` loggers to stream (stderr by default) in the chosen form."""
    global _direct
    handler = _EventHandler(stream or sys.stderr, form == "json")
    root = _relay_logger
    for old in list(root.handlers):
        old.flush()
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    _direct = handler


# Functions called with every event and its raw fields, whatever the log
# level: the metrics count events this way (see relay.metrics).
_observers: list[Callable[[str, dict[str, Any]], None]] = []


def add_observer(observer: Callable[[str, dict[str, Any]], None]) -> None:
    """Call observer(event, fields) for every later ``log_event``, logged or not."""
    _observers.append(observer)


class RepeatCounter:
    """A count of one repeated event, whose log line is due at most once per ``interval`` seconds.

    For events that a broken file or a flood of clients can repeat many
    times a second: the caller logs only when ``note`` returns a count.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._count = 0
        self._logged_at = -math.inf  # time.monotonic() of the last line

    def note(self) -> int | None:
        """Count one occurrence; return the count since the last line when a line is due, else None."""
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at < self.interval:
            return None
        count, self._count = self._count, 0
        self._logged_at = now
        return count


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with key=value fields; peer-supplied values are cleaned."""
    for observer in _observers:
        observer(event, fields)
    if not logger.isEnabledFor(level):
        return
    handler = _direct
    # The direct write skips the LogRecord and its caller lookup, which cost
    # more than the line itself.  It applies only while the logger's sole
    # destination is setup_logging's handler and nothing else (a test's
    # capture handler, a filter) has been attached since.
    if (
        handler is not None
        and level in _LEVEL_NAMES
        and not logger.handlers
        and not logger.filters
        and logger.propagate
        and logger.parent is _relay_logger
        and _relay_logger.handlers == [handler]
        and not handler.filters
        and not _relay_logger.filters
    ):
        handler.write_event(level, logger.name, event, fields)
        return
    logger.log(level, event, extra={"event": event, "fields": fields})
