"""The configuration reference documents every config key, and the operations guide every log event."""

from __future__ import annotations

import ast
import dataclasses
import re
import tomllib
from typing import Any

from conftest import REPO_ROOT
from relay import config as config_module
from relay.config import ListenerConfig, describe_defaults
from relay.units import format_duration, parse_duration, parse_host_port, parse_size

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


def documented_rows() -> dict[tuple[str, str], tuple[str, str]]:
    """Return {(section, key): (default cell, meaning cell)} from the reference's key tables."""
    rows: dict[tuple[str, str], tuple[str, str]] = {}
    section: str | None = None
    for line in REFERENCE.read_text().splitlines():
        heading = re.match(r"^## \[\[?([a-z]+)\]?\]$", line)
        if heading:
            section = heading.group(1)
            continue
        row = re.match(r"^\| `([a-z_]+)` \| (.*?) \| (.*)$", line)
        if row and section is not None:
            rows[(section, row.group(1))] = (row.group(2), row.group(3))
    return rows


def config_fields() -> dict[tuple[str, str], dataclasses.Field[Any]]:
    """Return {(section, key): dataclass field} for every config key."""
    sections: dict[str, type] = {**config_module._SECTIONS, "listener": ListenerConfig}
    return {
        (section, item.name): item
        for section, cls in sections.items()
        for item in dataclasses.fields(cls)
        if item.metadata
    }


def normalize(kind: str, value: Any, metadata: Any) -> Any:
    """Convert a documented TOML value to the type that a config field of ``kind`` stores."""
    if kind == "duration":
        return parse_duration(value)
    if kind == "size":
        return parse_size(value)
    if kind == "hostport":
        return parse_host_port(value)
    if kind == "hostports":
        return tuple(parse_host_port(item, metadata.get("default_port")) for item in value)
    if isinstance(value, list):
        return tuple(value)
    return value


def test_documented_defaults_match_code() -> None:
    defaults = describe_defaults()
    rows = documented_rows()

    for (section, key), spec in config_fields().items():
        default_cell = rows[(section, key)][0]
        code_default = defaults[section][key]
        literal = re.match(r"^`([^`]*)`", default_cell)
        if literal is None:
            # Prose such as "none" or "number of CPUs": an unset file or a computed default.
            computed = spec.default is dataclasses.MISSING
            assert computed or code_default == "", (
                f"[{section}] {key}: documented default {default_cell!r}, code default {code_default!r}"
            )
            continue
        documented = normalize(spec.metadata["kind"], tomllib.loads(f"v = {literal.group(1)}")["v"], spec.metadata)
        if spec.metadata["kind"] == "transport":
            code_default = dict(code_default)
        assert documented == code_default, (
            f"[{section}] {key}: documented default {literal.group(1)}, code default {code_default!r}"
        )


def documented_values(kind: str, text: str) -> set[Any]:
    """Return every value in backquotes in ``text`` that reads as a value of ``kind``."""
    values: set[Any] = set()
    for token in re.findall(r"`([^`]+)`", text):
        token = token.strip('"')
        try:
            values.add(int(token) if kind == "int" else normalize(kind, token, {}))
        except ValueError:
            continue
    return values


# Minimum of the integer and size keys whose row names none, as the reference's
# "Value forms" list states.
GENERAL_MINIMUM = 1


def test_documented_limits_match_code() -> None:
    rows = documented_rows()
    value_forms = REFERENCE.read_text().split("\n## ", 1)[0]

    assert f"`{config_module._INTEGER_CEILING}`" in value_forms, "the integer ceiling is not documented"
    duration_ceiling = format_duration(config_module._DURATION_CEILING)
    assert f'`"{duration_ceiling}"`' in value_forms, "the duration ceiling is not documented"
    for (section, key), spec in config_fields().items():
        kind = spec.metadata["kind"]
        if kind not in ("int", "size", "duration"):
            continue
        values = documented_values(kind, " ".join(rows[(section, key)]))
        low, high = spec.metadata.get("min"), spec.metadata.get("max")
        if kind != "duration":
            assert low is not None, f"[{section}] {key} accepts negative values"
            if low != GENERAL_MINIMUM:
                assert low in values, f"[{section}] {key}: minimum {low} is not documented"
        elif low is not None:
            assert low in values, f"[{section}] {key}: minimum {low}s is not documented"
        if high is not None:
            assert high in values, f"[{section}] {key}: maximum {high} is not documented"


def test_documented_zero_durations_match_code() -> None:
    rows = documented_rows()
    value_forms = REFERENCE.read_text().split("\n## ", 1)[0]
    sentence = re.search(r"only the keys marked\s+\"\(off\)\"\s+and\s+(.*?)\s+accept 0\.", value_forms, re.DOTALL)
    assert sentence is not None, "the list of durations that accept 0 is missing"
    documented = set(re.findall(r"`([a-z_]+)`", sentence.group(1)))
    documented |= {key for (_, key), (default, _) in rows.items() if "(off)" in default}

    accept_zero = {
        key
        for (_, key), spec in config_fields().items()
        if spec.metadata["kind"] == "duration" and not spec.metadata.get("positive") and not spec.metadata.get("min")
    }

    assert documented == accept_zero


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
