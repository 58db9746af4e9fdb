"""The configuration reference documents every key that relay/config.py defines."""

from __future__ import annotations

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
