"""The configuration reference documents every config key, and the operations guide every log event."""

from __future__ import annotations

import ast
import re

from conftest import REPO_ROOT
from relay.config import describe_defaults

REFERENCE = REPO_ROOT / "docs" / "configuration.md"


def documented_keys() -> dict[str, set[str]]:
    """Return {section: keys} from the reference's "## [section]" tables."""
    sections: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in REFERENCE.read_text().splitlines():
        heading = re.match(r"^## \[\[?([a-z]+)\]?\]$", line)
        if heading:
            current = sections.setdefault(heading.group(1), set())
            continue
        row = re.match(r"^\| `([a-z_]+)` \|", line)
        if row and current is not None:
            current.add(row.group(1))
    return sections


def test_every_config_key_documented() -> None:
    documented = documented_keys()

    for section, keys in describe_defaults().items():
        assert section in documented, f"section [{section}] missing from {REFERENCE.name}"
        missing = set(keys) - documented[section]
        assert not missing, f"[{section}] keys missing from {REFERENCE.name}: {sorted(missing)}"


def test_no_stale_keys_documented() -> None:
    defaults = describe_defaults()

    for section, keys in documented_keys().items():
        assert section in defaults, f"{REFERENCE.name} documents unknown section [{section}]"
        stale = keys - set(defaults[section])
        assert not stale, f"{REFERENCE.name} documents unknown [{section}] keys: {sorted(stale)}"


OPERATIONS = REPO_ROOT / "docs" / "operations.md"


def logged_events() -> dict[str, set[str]]:
    """Return {event: field names} of every log_event call in relay/ whose event is a string literal."""
    events: dict[str, set[str]] = {}
    for path in (REPO_ROOT / "relay").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            if node.func.id != "log_event" or len(node.args) < 2:
                continue
            event = node.args[1]
            if isinstance(event, ast.Constant) and isinstance(event.value, str):
                # A keyword of None is a **mapping, whose keys the call site does not show.
                fields = {keyword.arg for keyword in node.keywords if keyword.arg is not None}
                events.setdefault(event.value, set()).update(fields)
    return events


def documented_events() -> dict[str, str]:
    """Return {event: key fields text} from the event table of the "## Logs" section."""
    events: dict[str, str] = {}
    section = OPERATIONS.read_text().split("\n## Logs\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        for event in re.findall(r"`([a-z_]+)`", cells[0]):
            # An event with two rows (worker_failed) gets the fields of both.
            events[event] = events.get(event, "") + " " + cells[2]
    return events


def test_every_logged_event_documented() -> None:
    documented = documented_events()

    for event, fields in sorted(logged_events().items()):
        assert event in documented, f"event {event} is logged but missing from {OPERATIONS.name}"
        named = set(re.findall(r"`([a-z_]+)`", documented[event]))
        missing = fields - named
        assert not missing, f"fields of {event} missing from {OPERATIONS.name}: {sorted(missing)}"


def test_no_stale_events_documented() -> None:
    source = "\n".join(path.read_text() for path in (REPO_ROOT / "relay").rglob("*.py"))

    for event in documented_events():
        # The delivery result events come from a mapping, and "message" is the
        # event of records logged without log_event, so look for the quoted name.
        assert f'"{event}"' in source, f"{OPERATIONS.name} documents event {event}, which relay/ never logs"
