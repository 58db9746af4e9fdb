"""Structured event logging: one line per event, in ``text`` or ``json`` form.

Every module logs through ``log_event(logger, "event", key=value, ...)``.  The
text form is ``TIME LEVEL logger: event key=value ...`` like Postfix's
``queue-id: key=value`` lines; the json form is one orjson object per line
with the same fields.  Values from peers are truncated to
``MAX_VALUE_LENGTH`` characters and control characters are escaped, so a
hostile client cannot forge or flood log lines.  Callers never pass secrets
(passwords, AUTH responses).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

# Long enough for an SMTP reply line (512 octets), short enough to keep one
# hostile client from filling the log.
MAX_VALUE_LENGTH = 512

_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {0x7F: "\\x7f", ord("\\"): "\\\\"}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def clean(value: Any) -> Any:
    """Return value made safe for one log line: text escaped and truncated."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        if len(value) > MAX_VALUE_LENGTH:
            value = value[:MAX_VALUE_LENGTH] + "..."
        return value.translate(_ESCAPES)
    if isinstance(value, (list, tuple)):
        return [clean(item) for item in value]
    return value


def _quote(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    text = str(value)
    if text == "" or any(c in text for c in ' "='):
        return '"' + text.replace('"', '\\"') + '"'
    return text


class _EventFormatter(logging.Formatter):
    def __init__(self, json_form: bool) -> None:
        super().__init__()
        self.json_form = json_form

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None) or "message"
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        if event == "message":
            fields = {"text": clean(record.getMessage()), **fields}
        if record.exc_info:
            fields = {**fields, "exception": clean(self.formatException(record.exc_info))}

        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        if self.json_form:
            document = {"ts": stamp, "level": record.levelname.lower(), "logger": record.name, "event": event}
            document.update(fields)
            return orjson.dumps(document, default=str).decode()
        parts = [stamp, record.levelname.lower(), f"{record.name}:", event]
        parts.extend(f"{key}={_quote(value)}" for key, value in fields.items())
        return " ".join(parts)


def setup_logging(form: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Route the ``relay`` loggers to stream (stderr by default) in the chosen form."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_EventFormatter(form == "json"))
    root = logging.getLogger("relay")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


# Functions called with every event and its raw fields, whatever the log
# level: the metrics count events this way (see relay.metrics).
_observers: list[Callable[[str, dict[str, Any]], None]] = []


def add_observer(observer: Callable[[str, dict[str, Any]], None]) -> None:
    """Call observer(event, fields) for every later ``log_event``, logged or not."""
    _observers.append(observer)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with key=value fields; peer-supplied values are cleaned."""
    for observer in _observers:
        observer(event, fields)
    if logger.isEnabledFor(level):
        cleaned = {key: clean(value) for key, value in fields.items()}
        logger.log(level, event, extra={"event": event, "fields": cleaned})
