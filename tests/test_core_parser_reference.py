"""The compiled MAIL and RCPT parser against a plain reading of the grammar.

``reference_parse`` below restates the path and parameter grammar of RFC
5321 section 4.1.2 as regular expressions, independent of the state machine
in ``csrc/parser.pyx``.  It covers RFC 6531's UTF-8 additions, RFC 1870
SIZE, RFC 6152 BODY, RFC 3461 RET, ENVID, NOTIFY and ORCPT, and RFC 4954
AUTH.  It
also states the lenient forms and the order of checks that the parser's
module docstring documents.  Generated command lines must get the same
result from both: the same path, local part, domain and parameters, or the
same reply code and enhanced status code.

The reference follows RFC 5321 except in four places, where it follows
the parser's documented or inherited behaviour:

- A source route may name address literals, not only domains (the route
  is dropped anyway).
- ``IPv6-comp`` may hold 7 groups besides ``::`` (RFC 4291 section 2.2),
  where RFC 5321 allows 6.  Python's ``ipaddress``, which the parser
  uses, accepts the RFC 4291 form.
- The IPv4 part of an ``IPv6v4`` literal may not have leading zeros,
  because ``ipaddress`` rejects them, while a plain IPv4 literal may.
- ``<postmaster>`` in RCPT may carry a source route, like any other path.

``RELAY_FUZZ_EXAMPLES`` raises the example count for long runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay._errors import SMTPError
from relay._parser import parse_command

EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "1500"))
REFERENCE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- the grammar, on octets: an octet >= 0x80 stands for part of a UTF-8
# character (RFC 6531 section 3.3), and the whole mailbox must be valid UTF-8.
NON_ASCII = rb"\x80-\xff"
ATEXT = rb"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~" + NON_ASCII + rb"]"
DOT_STRING = ATEXT + rb"+(?:\." + ATEXT + rb"+)*"
QUOTED_STRING = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e' + NON_ASCII + rb"]|\\[\x20-\x7e])*\""
LOCAL_PART = rb"(?:" + DOT_STRING + rb"|" + QUOTED_STRING + rb")"
LET_DIG = rb"[A-Za-z0-9" + NON_ASCII + rb"]"
LABEL = LET_DIG + rb"(?:[A-Za-z0-9\-" + NON_ASCII + rb"]*" + LET_DIG + rb")?"
DOMAIN = LABEL + rb"(?:\." + LABEL + rb")*"
LITERAL = rb"\[[^\[\]]*\]"
DOMAIN_OR_LITERAL = rb"(?:" + DOMAIN + rb"|" + LITERAL + rb")"
MAILBOX = rb"(?P<local>" + LOCAL_PART + rb")@(?P<domain>" + DOMAIN_OR_LITERAL + rb")"
SOURCE_ROUTE = rb"@(?P<route>" + DOMAIN_OR_LITERAL + rb"(?:,@" + DOMAIN_OR_LITERAL + rb")*):"

BRACKETED = re.compile(rb"<(?:" + SOURCE_ROUTE + rb")?" + MAILBOX + rb">")
UNBRACKETED = re.compile(MAILBOX)
ROUTE_PART = re.compile(DOMAIN_OR_LITERAL)
ROUTED_POSTMASTER = re.compile(rb"<" + SOURCE_ROUTE + rb"(?=postmaster>)", re.IGNORECASE)

SNUM = re.compile(rb"[0-9]{1,3}\Z")
HEX_GROUP = re.compile(rb"[0-9A-Fa-f]{1,4}\Z")
KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9\-]*\Z")
VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e" + NON_ASCII + rb"]+\Z")
XCHAR_OR_HEXCHAR = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")


def ipv4_literal(text: bytes, *, leading_zeros: bool = True) -> bool:
    parts = text.split(b".")
    if len(parts) != 4:
        return False
    for part in parts:
        if not SNUM.match(part) or int(part) > 255:
            return False
        if not leading_zeros and len(part) > 1 and part.startswith(b"0"):
            return False
    return True


def ipv6_literal(text: bytes) -> bool:
    """Check RFC 5321 IPv6-addr, with the RFC 4291 group count (see the module docstring)."""
    groups_allowed = 8
    head = text
    if b"." in text:
        # IPv6v4: the IPv4 address takes the place of the last two groups.
        prefix, _, ipv4 = text.rpartition(b":")
        if not ipv4_literal(ipv4, leading_zeros=False):
            return False
        groups_allowed = 6
        head = prefix + b":" if prefix.endswith(b":") else prefix
    if head.count(b"::") > 1:
        return False
    if b"::" in head:
        left, right = head.split(b"::")
        groups = []
        if left:
            groups += left.split(b":")
        if right:
            groups += right.split(b":")
        if len(groups) > groups_allowed - 1:
            return False
    else:
        groups = head.split(b":") if head else []
        if len(groups) != groups_allowed:
            return False
    return all(HEX_GROUP.match(group) for group in groups)


def literal_ok(literal: bytes) -> bool:
    inner = literal[1:-1]
    if inner[:5].upper() == b"IPV6:":
        return ipv6_literal(inner[5:])
    return ipv4_literal(inner)


def domain_ok(domain: bytes) -> bool:
    """RFC 1035 section 2.3.4 lengths for a domain, the syntax for a literal."""
    if domain.startswith(b"["):
        return literal_ok(domain)
    return len(domain) <= 255 and all(len(label) <= 63 for label in domain.split(b"."))


@dataclass
class Parsed:
    path: str
    local_part: str
    domain: str
    params: dict[str, str | None]
    fields: dict[str, object]


def error(code: int, enhanced: str) -> tuple[int, str]:
    return (code, enhanced)


def match_path(text: bytes, recipient: bool) -> tuple[bytes, bytes, bytes, int] | None:
    """Return (mailbox, local part, domain, end of the path in ``text``), or None for a bad path."""
    if text.startswith(b"<>") and (len(text) == 2 or text[2:3] == b" "):
        return None if recipient else (b"", b"", b"", 2)
    if recipient:
        # "<postmaster>", "postmaster" or "<@route:postmaster>", in any letter case.
        routed = ROUTED_POSTMASTER.match(text)
        if routed is not None and route_ok(routed.group("route")):
            forms = [(routed.end(), b"postmaster>")]
        else:
            forms = [(1, b"postmaster>"), (0, b"postmaster")] if text.startswith(b"<") else [(0, b"postmaster")]
        for start, word in forms:
            end = start + len(word)
            if text[start:end].lower() == word and (len(text) == end or text[end : end + 1] == b" "):
                inner = text[start : start + 10]
                return (inner, inner, b"", end)
    pattern = BRACKETED if text.startswith(b"<") else UNBRACKETED
    match = pattern.match(text)
    if match is None or (match.end() < len(text) and text[match.end()] != 0x20):
        return None
    if not domain_ok(match.group("domain")):
        return None
    route = match.groupdict().get("route")
    if route is not None and not route_ok(route):
        return None
    local, domain = match.group("local"), match.group("domain")
    return (local + b"@" + domain, local, domain, match.end())


def route_ok(route: bytes) -> bool:
    return all(ROUTE_PART.fullmatch(part) and domain_ok(part) for part in route.split(b",@"))


def xtext(value: bytes) -> str | None:
    if not XCHAR_OR_HEXCHAR.match(value):
        return None
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == 0x2B:
            octet = int(value[i + 1 : i + 3], 16)
            if octet < 32 or octet == 127:
                return None
            out.append(octet)
            i += 3
        else:
            out.append(value[i])
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


def apply_param(
    keyword: str, value: bytes | None, recipient: bool, fields: dict[str, object]
) -> tuple[int, str] | None:
    """Decode one parameter into ``fields``; return (code, enhanced) when its value is invalid."""
    bad = error(501, "5.5.4")
    ascii_value = value is not None and value.isascii()
    if recipient:
        if keyword == "NOTIFY":
            if not ascii_value:
                return bad
            assert value is not None
            items = value.decode().upper().split(",")
            if len(set(items)) != len(items):
                return bad
            if items != ["NEVER"] and not set(items) <= {"SUCCESS", "FAILURE", "DELAY"}:
                return bad
            fields["notify"] = tuple(items)
            return None
        if keyword == "ORCPT":
            if not ascii_value or value is None or len(value) > 500:
                return bad
            kind, semicolon, address = value.partition(b";")
            if not semicolon or not kind or not address or not re.fullmatch(ATEXT + rb"+", kind):
                return bad
            decoded = xtext(address)
            if decoded is None:
                return bad
            fields["orcpt"] = (kind.decode(), decoded)
            return None
        return error(555, "5.5.4")
    if keyword == "SIZE":
        if value is None or not re.fullmatch(rb"[0-9]{1,20}", value):
            return bad
        fields["size"] = int(value)
        return None
    if keyword in ("BODY", "RET"):
        choices = ("7BIT", "8BITMIME", "BINARYMIME") if keyword == "BODY" else ("FULL", "HDRS")
        if not ascii_value or value is None or value.decode().upper() not in choices:
            return bad
        fields[keyword.lower()] = value.decode().upper()
        return None
    if keyword == "SMTPUTF8":
        if value is not None:
            return bad
        fields["smtputf8"] = True
        return None
    if keyword in ("ENVID", "AUTH"):
        if not ascii_value or value is None or (keyword == "ENVID" and len(value) > 100):
            return bad
        decoded = xtext(value)
        if decoded is None:
            return bad
        fields[keyword.lower()] = decoded
        return None
    return error(555, "5.5.4")


def reference_parse(line: bytes) -> Parsed | tuple[int, str]:
    """Parse a MAIL or RCPT line by the grammar; return the result or (code, enhanced)."""
    verb, _, rest = line.partition(b" ")
    if verb.upper() not in (b"MAIL", b"RCPT"):
        return error(500, "5.5.1")
    recipient = verb.upper() == b"RCPT"
    if any(octet < 32 or octet == 127 for octet in line[len(verb) :]):
        return error(501, "5.5.2")
    rest = rest.lstrip(b" ").rstrip(b" ")
    keyword = b"TO:" if recipient else b"FROM:"
    if rest[: len(keyword)].upper() != keyword:
        return error(501, "5.5.4")
    rest = rest[len(keyword) :].lstrip(b" ")
    bad_address = error(501, "5.1.3" if recipient else "5.1.7")
    matched = match_path(rest, recipient)
    if matched is None:
        return bad_address
    mailbox, local, domain, end = matched
    octets = end if rest.startswith(b"<") else end + 2
    if octets > 256:
        return bad_address

    params: dict[str, str | None] = {}
    fields: dict[str, object] = {}
    tail = rest[end:]
    for word in tail.split(b" "):
        if not word:
            continue
        name, equals, raw_value = word.partition(b"=")
        value = raw_value if equals else None
        if not KEYWORD.match(name) or (equals and not VALUE.match(raw_value)):
            return error(501, "5.5.4")
        try:
            text = None if value is None else value.decode("utf-8")
        except UnicodeDecodeError:
            return error(501, "5.5.4")
        key = name.decode().upper()
        if key in params:
            if params[key] == text:
                continue
            return error(501, "5.5.4")
        params[key] = text
        failure = apply_param(key, value, recipient, fields)
        if failure is not None:
            return failure

    if not mailbox.isascii():
        if not recipient and not fields.get("smtputf8"):
            return error(553, "5.6.7")
        try:
            mailbox.decode("utf-8")
        except UnicodeDecodeError:
            return bad_address
    return Parsed(mailbox.decode(), local.decode(), domain.decode(), params, fields)


def compiled_parse(line: bytes) -> Parsed | tuple[int, str]:
    try:
        command = parse_command(line)
    except SMTPError as raised:
        return (raised.code, raised.enhanced)
    fields: dict[str, object] = {}
    for name in ("size", "body", "ret", "envid", "auth", "notify", "orcpt"):
        value = getattr(command, name)
        if value is not None:
            fields[name] = value
    if command.smtputf8:
        fields["smtputf8"] = True
    assert command.path is not None
    assert command.local_part is not None
    assert command.domain is not None
    return Parsed(command.path, command.local_part, command.domain, command.params, fields)


# --- generated command lines: grammar pieces, mostly valid, with faults mixed in.

LOCAL_PARTS = [b"user", b"first.last", b"a+tag", b"!#$%&'*+-/=?^_`{|}~", b'"a b"', b'"a\\"b"', b'"a@b"',
               b'""', b'"\\\\"', b"\xc3\xa9l\xc3\xa8ve", b'"\xe4\xbe\x8b"', b"postmaster", b"PostMaster",
               b"x" * 64, b"y" * 200, b"a..b", b".a", b"a.", b'"a', b'"a\\', b'"\\\x80"', b"a b", b"\xe9",
               b"a\xff", b"<", b"a>b", b"a,b", b"a:b", b"a;b", b"a(b)", b"\xc3"]
DOMAINS = [b"example.com", b"EXAMPLE.test", b"a", b"1.2.3.4", b"xn--bcher-kva.example", b"b\xc3\xbccher.example",
           b"a-b.example", b"-a.example", b"a-.example", b"a..example", b"example.", b".example",
           b"l" * 63 + b".example", b"l" * 64 + b".example", b"a_b.example", b"\xff.example", b"",
           b"[192.0.2.1]", b"[001.002.003.004]", b"[256.1.1.1]", b"[1.2.3]", b"[1.2.3.4.5]", b"[]",
           b"[IPv6:2001:db8::1]", b"[ipv6:::1]", b"[IPv6:::]", b"[IPv6:1:2:3:4:5:6:7:8]",
           b"[IPv6:1:2:3:4:5:6:7:8:9]", b"[IPv6:1:2:3:4:5:6:7::]", b"[IPv6:1::2::3]", b"[IPv6:12345::1]",
           b"[IPv6:::ffff:192.0.2.1]", b"[IPv6:1:2:3:4:5:6:192.0.2.1]", b"[IPv6:::ffff:01.2.3.4]",
           b"[IPv6:fe80::1%eth0]", b"[IPv6:]", b"[IPv6:g::1]", b"[x:1]", b"[192.0.2.1"]
ROUTES = [b"", b"", b"", b"@relay.example:", b"@a.example,@b.example:", b"@[192.0.2.1]:", b"@a.example,b:",
          b"@:", b"@a.example", b"@-a:"]
PARAMS = [b"SIZE=1000", b"size=0", b"SIZE=" + b"9" * 20, b"SIZE=" + b"9" * 21, b"SIZE=-1", b"SIZE=+1", b"SIZE=",
          b"BODY=8BITMIME", b"body=7bit", b"BODY=BINARYMIME", b"BODY=9BIT", b"SMTPUTF8", b"SMTPUTF8=1",
          b"RET=HDRS", b"RET=full", b"RET=PART", b"ENVID=abc+2Bdef", b"ENVID=" + b"e" * 101, b"ENVID=a+0A",
          b"AUTH=<>", b"AUTH=user+40example.com", b"AUTH=a+", b"NOTIFY=NEVER", b"NOTIFY=success,delay",
          b"NOTIFY=NEVER,DELAY", b"NOTIFY=SUCCESS,SUCCESS", b"ORCPT=rfc822;a+40b", b"ORCPT=rfc822;",
          b"ORCPT=;a", b"ORCPT=utf-8;caf\xc3\xa9", b"X-UNKNOWN", b"X-VALUE=\xc3\xa9", b"X=\xe9", b"-BAD",
          b"A=B=C", b"=", b"K="]
VERB_FORMS = [b"MAIL FROM:", b"mail from:", b"MAIL FROM: ", b"MAIL FROM:  ", b"MAIL  FROM:", b"MAIL FROM :",
              b"RCPT TO:", b"rcpt to:", b"RCPT TO: ", b"RCPT  TO:", b"RCPT TO"]


@st.composite
def command_lines(draw: st.DrawFn) -> bytes:
    verb = draw(st.sampled_from(VERB_FORMS))
    form = draw(st.sampled_from(["bracketed", "bracketed", "bare", "null", "postmaster"]))
    if form == "null":
        path = b"<>"
    elif form == "postmaster":
        path = draw(st.sampled_from([b"<postmaster>", b"<POSTMASTER>", b"postmaster", b"<postmaster"]))
    else:
        local = draw(st.sampled_from(LOCAL_PARTS))
        domain = draw(st.sampled_from(DOMAINS))
        separator = draw(st.sampled_from([b"@", b"@", b"@", b"", b"@@"]))
        mailbox = local + separator + domain
        if form == "bracketed":
            path = b"<" + draw(st.sampled_from(ROUTES)) + mailbox + draw(st.sampled_from([b">", b">", b""]))
        else:
            path = mailbox
    params = draw(st.lists(st.sampled_from(PARAMS), max_size=4))
    spaces = draw(st.sampled_from([b" ", b" ", b"  "]))
    tail = b"".join(spaces + param for param in params)
    line = verb + path + tail + draw(st.sampled_from([b"", b"", b" ", b"\t", b"\x00", b"\r"]))
    # Now and then flip one octet, so inputs off the grammar's paths appear too.
    if draw(st.integers(0, 9)) == 0 and line:
        at = draw(st.integers(0, len(line) - 1))
        line = line[:at] + bytes([draw(st.integers(0, 255))]) + line[at + 1 :]
    return line


def test_reference_on_samples() -> None:
    assert isinstance(reference_parse(b"MAIL FROM:<a@example.com> SIZE=5"), Parsed)
    assert reference_parse(b"MAIL FROM:<a@example.com> SIZE=x") == (501, "5.5.4")
    assert reference_parse(b"RCPT TO:<>") == (501, "5.1.3")
    assert reference_parse(b"MAIL FROM:<\xc3\xa9@example.com>") == (553, "5.6.7")
    assert ipv6_literal(b"::ffff:192.0.2.1")
    assert not ipv6_literal(b"1:2:3:4:5:6:7:8:9")


@REFERENCE
@given(command_lines())
@example(b"MAIL FROM:<a@[IPv6:1:2:3:4:5:6:7::]>")
@example(b"RCPT TO:<@a.example,@[192.0.2.1]:b@example.com> NOTIFY=NEVER")
@example(b'MAIL FROM:<"\xc3\xa9"@example.com> SMTPUTF8')
def test_parser_matches_reference(line: bytes) -> None:
    expected = reference_parse(line)
    got = compiled_parse(line)
    assert got == expected, line
