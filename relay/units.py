"""Parse the human-friendly values used in relay.toml: sizes, durations, host:port.

Sizes are octets with an optional binary suffix (``10M`` = 10 MiB).  Durations
are seconds with an optional unit (``30s``, ``5m``, ``4h``, ``5d``; Postfix's
time units, and ``ms``).  Addresses are ``HOST:PORT`` with IPv6 hosts in brackets
(``[::1]:25``).  Each parser raises ``ValueError`` with a message that names
the expected form, so callers can prefix the file and key.
"""

from __future__ import annotations

import ipaddress
import math
import re
import sys

# Digits that a size string may have, leading zeros aside: 30 digits is far above
# every size limit, and int() rejects strings of more than 4300 digits with a
# message about a Python setting.
MAX_SIZE_DIGITS = 30
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_DURATION_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# re.ASCII: \d would also match other scripts' digits, which int() then accepts.
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)B?\s*$", re.IGNORECASE | re.ASCII)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|[smhdw]|)\s*$", re.ASCII)
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def parse_size(value: int | str) -> int:
    """Return a size in octets from an integer or a string such as ``"10M"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10485760, \"512K\" or \"10M\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} is negative; expected 0 or more octets")
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"invalid size {value!r}; expected octets with an optional K, M or G suffix, such as \"10M\"")
    digits = match.group(1).lstrip("0") or "0"
    if len(digits) > MAX_SIZE_DIGITS:
        raise ValueError(
            f"size of {len(digits)} digits is too large; expected at most {MAX_SIZE_DIGITS} digits,"
            " with a K, M or G suffix for large sizes"
        )
    return int(digits) * _SIZE_UNITS[match.group(2).upper()]


def parse_duration(value: int | float | str) -> float:
    """Return a duration in seconds from a number or a string such as ``"5d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"30s\", \"5m\", \"4h\" or \"5d\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration {value} is negative; expected 0 or more seconds")
        # float() raises OverflowError for an integer beyond the largest float.
        if isinstance(value, int) and value > sys.float_info.max:
            raise ValueError(
                f"duration of {len(str(value))} digits is too large; expected finite seconds, such as \"5d\""
            )
        return float(value)
    match = _DURATION_RE.match(value)
    if match is None:
        if value.strip().startswith("-"):
            raise ValueError(f"duration {value!r} is negative; expected 0 or more, such as \"30s\"")
        raise ValueError(
            f"invalid duration {value!r}; expected a number with an optional unit ms, s, m, h, d or w,"
            " such as \"30s\" or \"5d\""
        )
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    # float() turns a number beyond 1.8e308 into inf, which a duration must not be.
    if not math.isfinite(seconds):
        raise ValueError(
            f"duration of {len(match.group(1))} characters is too large; expected finite seconds, such as \"5d\""
        )
    return seconds


def format_duration(seconds: float) -> str:
    """Return ``seconds`` in the largest unit that divides it, as a config file would write it (``"100ms"``)."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit in ("w", "d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def is_hostname(name: str) -> bool:
    """Return whether ``name`` is a syntactically valid DNS host name."""
    # fullmatch: the pattern's "$" also matches before a final newline, so
    # match() accepted "mx.example.test\n".
    return _HOSTNAME_RE.fullmatch(name) is not None


# RFC 1035 section 2.3.4: a label is at most 63 octets.
_MAX_LABEL_OCTETS = 63
# RFC 1123 section 2.1 host name characters: ASCII letters, digits and hyphens.
_LABEL_CHARACTER = re.compile(r"[A-Za-z0-9-]")


def hostname_problem(name: str) -> str | None:
    """Return which DNS host name rule ``name`` breaks, or None when ``is_hostname`` accepts it."""
    if is_hostname(name):
        return None
    if not name:
        return "the name is empty"
    for label in name.removesuffix(".").split("."):
        if not label:
            return "it has an empty label (a leading dot or two dots in a row)"
        octets = len(label.encode())
        if octets > _MAX_LABEL_OCTETS:
            return f"label {label[:16]!r}... is {octets} octets, over the maximum of {_MAX_LABEL_OCTETS}"
        bad = next((character for character in label if not _LABEL_CHARACTER.fullmatch(character)), None)
        if bad is not None:
            return f"label {label!r} contains {bad!r}; use only ASCII letters, digits and hyphens"
        if label.startswith("-") or label.endswith("-"):
            return f"label {label!r} starts or ends with a hyphen"
    # The regular expression also caps the whole name at 253 characters.
    return f"the name is {len(name)} characters, over the maximum of 253"


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a host and a port number.

    With ``default_port`` the port may be left out.  The host is an IP address
    or a DNS name; brackets are removed from IPv6 literals.
    """
    expected = "expected HOST:PORT, such as \"127.0.0.1:2525\" or \"[::1]:2525\""
    host: str
    port_text: str | None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"invalid address {value!r}: missing ']'; {expected}")
        host = value[1:end]
        rest = value[end + 1 :]
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"invalid address {value!r}; {expected}")
    else:
        if value.count(":") > 1:
            raise ValueError(f"invalid address {value!r}: put an IPv6 address in brackets; {expected}")
        host, sep, port_text_raw = value.partition(":")
        port_text = port_text_raw if sep else None

    if port_text is None:
        if default_port is None:
            raise ValueError(f"invalid address {value!r}: missing port; {expected}")
        port = default_port
    else:
        # ASCII only: int() also reads other scripts' digits, and "²" passes isdigit().
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"invalid port in {value!r}; expected a number from 1 to 65535")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {port} in {value!r}; expected a number from 1 to 65535")

    if host == "":
        raise ValueError(f"invalid address {value!r}: missing host; {expected}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if all(label.isascii() and label.isdigit() for label in host.removesuffix(".").split(".")):
            # RFC 3696 section 2: a top-level domain is never all-numeric, so dotted
            # digits can only be an IPv4 address.
            raise ValueError(
                f"invalid IPv4 address {host!r} in {value!r}; expected four numbers from 0 to 255 without"
                " leading zeros, such as 192.0.2.1"
            ) from None
        if not is_hostname(host):
            raise ValueError(f"invalid host {host!r} in {value!r}; expected an IP address or a DNS name") from None
    return host, port


def format_host_port(host: str, port: int) -> str:
    """Return ``HOST:PORT``, bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# A local part that may name a folder under maildir_root: no "/" and no leading
# dot, so it can neither leave the root ("..") nor name a hidden folder.
_SAFE_USER_NAME = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*$")
# The longest file name that Linux file systems such as ext4 and XFS accept
# (NAME_MAX).  A longer name makes every lookup fail with ENAMETOOLONG.
MAX_USER_NAME_LENGTH = 255


def is_safe_user_name(name: str) -> bool:
    """Return whether ``name`` can be a Maildir folder name under maildir_root.

    Two dots in a row are rejected too: a dot-atom local part cannot contain
    them (RFC 5322 section 3.2.3).
    """
    return len(name) <= MAX_USER_NAME_LENGTH and _SAFE_USER_NAME.fullmatch(name) is not None and ".." not in name
