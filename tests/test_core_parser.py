"""Table-driven tests of the compiled command parser (relay._parser).

Each row is one command line (without its line end) and either the fields
the parsed command must have or the exact reply code and enhanced code of
the SMTPError it must raise.
"""

from typing import Any

import pytest

from relay._errors import SMTPError
from relay._parser import MAX_PATH, VERBS, parse_command, xtext_decode, xtext_encode

OK = dict[str, Any]
Row = tuple[bytes, OK | tuple[int, str]]

LONG_LOCAL = b"a" * 240

# fmt: off
VALID: list[tuple[bytes, OK]] = [
    # Verbs, case-insensitive (RFC 5321 section 2.4).
    (b"EHLO client.example.com", {"verb": "EHLO", "argument": "client.example.com"}),
    (b"ehlo client.example.com", {"verb": "EHLO", "argument": "client.example.com"}),
    (b"HELO client.example.com", {"verb": "HELO", "argument": "client.example.com"}),
    (b"EHLO [192.0.2.1]", {"verb": "EHLO", "argument": "[192.0.2.1]"}),
    (b"EHLO " + b"a" * 490, {"verb": "EHLO", "argument": "a" * 490}),
    (b"EHLO  client.example.com  ", {"verb": "EHLO", "argument": "client.example.com"}),
    (b"EHLO b\xc3\xbccher.example", {"verb": "EHLO", "argument": "b\u00fccher.example"}),
    (b"DATA", {"verb": "DATA", "argument": ""}),
    (b"data", {"verb": "DATA"}),
    (b"DATA ", {"verb": "DATA", "argument": ""}),
    (b"RSET", {"verb": "RSET"}),
    (b"rset", {"verb": "RSET"}),
    (b"QUIT", {"verb": "QUIT"}),
    (b"NOOP", {"verb": "NOOP", "argument": ""}),
    (b"NOOP anything at all", {"verb": "NOOP", "argument": "anything at all"}),
    (b"HELP", {"verb": "HELP", "argument": ""}),
    (b"HELP MAIL", {"verb": "HELP", "argument": "MAIL"}),
    (b"VRFY postmaster", {"verb": "VRFY", "argument": "postmaster"}),
    (b"EXPN staff", {"verb": "EXPN", "argument": "staff"}),
    (b"STARTTLS", {"verb": "STARTTLS"}),
    (b"StartTLS", {"verb": "STARTTLS"}),
    (b"AUTH PLAIN", {"verb": "AUTH", "mechanism": "PLAIN", "initial_response": None}),
    (b"AUTH plain AHVzZXIAcGFzcw==",
     {"mechanism": "PLAIN", "initial_response": "AHVzZXIAcGFzcw=="}),
    (b"AUTH LOGIN", {"mechanism": "LOGIN"}),
    (b"AUTH PLAIN =", {"mechanism": "PLAIN", "initial_response": "="}),
    (b"AUTH CRAM-MD5", {"mechanism": "CRAM-MD5"}),
    (b"AUTH SCRAM-SHA-256", {"mechanism": "SCRAM-SHA-256"}),
    (b"AUTH X_CUSTOM", {"mechanism": "X_CUSTOM"}),
    (b"BDAT 0 LAST", {"verb": "BDAT", "chunk_size": 0, "last": True}),
    (b"BDAT 9 LAST", {"chunk_size": 9, "last": True}),
    (b"BDAT 1000", {"chunk_size": 1000, "last": False}),
    (b"bdat 27 last", {"chunk_size": 27, "last": True}),
    (b"BDAT 99999999999999999999", {"chunk_size": 99999999999999999999}),
    # MAIL: paths.
    (b"MAIL FROM:<sender@example.com>",
     {"verb": "MAIL", "path": "sender@example.com", "local_part": "sender",
      "domain": "example.com", "size": None, "body": None, "smtputf8": False}),
    (b"mail from:<sender@example.com>", {"path": "sender@example.com"}),
    (b"Mail From:<sender@example.com>", {"path": "sender@example.com"}),
    (b"MAIL FROM:<>", {"path": "", "local_part": "", "domain": ""}),
    (b"MAIL FROM:<> SIZE=100", {"path": "", "size": 100}),
    (b"MAIL FROM: <sender@example.com>", {"path": "sender@example.com"}),
    (b"MAIL FROM:   <sender@example.com>", {"path": "sender@example.com"}),
    (b"MAIL FROM:sender@example.com", {"path": "sender@example.com"}),
    (b"MAIL FROM:sender@example.com SIZE=10", {"path": "sender@example.com", "size": 10}),
    (b"MAIL FROM: sender@example.com", {"path": "sender@example.com"}),
    (b'MAIL FROM:<""@example.com>', {"path": '""@example.com', "local_part": '""'}),
    (b'MAIL FROM:<"a b"@example.com>', {"path": '"a b"@example.com'}),
    (b'MAIL FROM:"a b"@example.com', {"path": '"a b"@example.com'}),
    (b'MAIL FROM:<"info@"@example.com>',
     {"path": '"info@"@example.com', "local_part": '"info@"', "domain": "example.com"}),
    (b'MAIL FROM:<"a\\"b"@example.com>', {"path": '"a\\"b"@example.com'}),
    (b'MAIL FROM:<"a\\\\b"@example.com>', {"path": '"a\\\\b"@example.com'}),
    (b'MAIL FROM:<"@"@example.com>', {"path": '"@"@example.com', "local_part": '"@"'}),
    (b"MAIL FROM:<first.last@example.com>", {"path": "first.last@example.com"}),
    (b"MAIL FROM:<a+tag@example.com>", {"path": "a+tag@example.com"}),
    (b"MAIL FROM:<!#$%&'*+-/=?^_`{|}~@example.com>",
     {"path": "!#$%&'*+-/=?^_`{|}~@example.com"}),
    (b"MAIL FROM:<x@a-b.example.com>", {"domain": "a-b.example.com"}),
    (b"MAIL FROM:<x@1.example>", {"domain": "1.example"}),
    (b"MAIL FROM:<x@localhost>", {"domain": "localhost"}),
    (b"MAIL FROM:<x@" + b"a" * 63 + b".example>", {"domain": "a" * 63 + ".example"}),
    (b"MAIL FROM:<x@[192.0.2.1]>", {"domain": "[192.0.2.1]"}),
    (b"MAIL FROM:<x@[IPv6:2001:db8::1]>", {"domain": "[IPv6:2001:db8::1]"}),
    (b"MAIL FROM:<x@[ipv6:2001:db8::1]>", {"domain": "[ipv6:2001:db8::1]"}),
    (b"MAIL FROM:<x@[IPv6:::ffff:192.0.2.1]>", {"domain": "[IPv6:::ffff:192.0.2.1]"}),
    (b"MAIL FROM:<@relay.example:sender@example.com>", {"path": "sender@example.com"}),
    (b"MAIL FROM:<@a.example,@b.example:sender@example.com>", {"path": "sender@example.com"}),
    (b"MAIL FROM:<" + LONG_LOCAL + b"@example.com>", {"local_part": "a" * 240}),
    # MAIL: parameters.
    (b"MAIL FROM:<a@example.com> SIZE=0", {"size": 0, "params": {"SIZE": "0"}}),
    (b"MAIL FROM:<a@example.com> SIZE=36700160", {"size": 36700160}),
    (b"MAIL FROM:<a@example.com> size=500", {"size": 500}),
    (b"MAIL FROM:<a@example.com> SIZE=99999999999999999999", {"size": 99999999999999999999}),
    (b"MAIL FROM:<a@example.com> BODY=8BITMIME", {"body": "8BITMIME"}),
    (b"MAIL FROM:<a@example.com> body=8bitmime", {"body": "8BITMIME"}),
    (b"MAIL FROM:<a@example.com> BODY=8bitMIME", {"body": "8BITMIME"}),
    (b"MAIL FROM:<a@example.com> BODY=7bit", {"body": "7BIT"}),
    (b"MAIL FROM:<a@example.com> BODY=BINARYMIME", {"body": "BINARYMIME"}),
    (b"MAIL FROM:<a@example.com> SMTPUTF8", {"smtputf8": True, "params": {"SMTPUTF8": None}}),
    (b"MAIL FROM:<a@example.com> smtputf8", {"smtputf8": True}),
    (b"MAIL FROM:<a@example.com> RET=FULL", {"ret": "FULL"}),
    (b"MAIL FROM:<a@example.com> RET=hdrs", {"ret": "HDRS"}),
    (b"MAIL FROM:<a@example.com> ENVID=QQ314159", {"envid": "QQ314159"}),
    (b"MAIL FROM:<a@example.com> ENVID=a+2Bb+3Dc", {"envid": "a+b=c"}),
    (b"MAIL FROM:<a@example.com> AUTH=<>", {"auth": "<>"}),
    (b"MAIL FROM:<a@example.com> AUTH=sender+40example.com", {"auth": "sender@example.com"}),
    (b"MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME RET=HDRS ENVID=x1",
     {"size": 10, "body": "8BITMIME", "ret": "HDRS", "envid": "x1"}),
    (b"MAIL FROM:<a@example.com>  SIZE=10   BODY=7BIT", {"size": 10, "body": "7BIT"}),
    # An exact repeat is ignored (Python's smtplib sends one); different values are not.
    (b"MAIL FROM:<a@example.com> BODY=8BITMIME SMTPUTF8 BODY=8BITMIME SMTPUTF8",
     {"body": "8BITMIME", "smtputf8": True, "params": {"BODY": "8BITMIME", "SMTPUTF8": None}}),
    (b"RCPT TO:<a@example.com> NOTIFY=SUCCESS NOTIFY=SUCCESS", {"notify": ("SUCCESS",)}),
    (b"MAIL FROM:<a@example.com> SIZE=10 ", {"size": 10}),
    (b"MAIL FROM:<s\xc3\xa9nder@example.com> SMTPUTF8",
     {"path": "s\u00e9nder@example.com", "local_part": "s\u00e9nder", "smtputf8": True}),
    (b"MAIL FROM:<\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90.\xe5\xb9\xbf\xe5\x91\x8a> SMTPUTF8",
     {"local_part": "\u7528\u6237", "domain": "\u4f8b\u5b50.\u5e7f\u544a"}),
    (b'MAIL FROM:<"\xc3\xa9 x"@example.com> SMTPUTF8', {"path": '"\u00e9 x"@example.com'}),
    (b"RCPT TO:<r\xc3\xa9@b\xc3\xbccher.example>",
     {"path": "r\u00e9@b\u00fccher.example", "local_part": "r\u00e9", "domain": "b\u00fccher.example"}),
    # RCPT
    (b"RCPT TO:<rcpt@example.net>",
     {"verb": "RCPT", "path": "rcpt@example.net", "notify": None, "orcpt": None}),
    (b"rcpt to:<rcpt@example.net>", {"path": "rcpt@example.net"}),
    (b"RCPT TO: <rcpt@example.net>", {"path": "rcpt@example.net"}),
    (b"RCPT TO:rcpt@example.net", {"path": "rcpt@example.net"}),
    (b"RCPT TO:<postmaster>", {"path": "postmaster", "local_part": "postmaster", "domain": ""}),
    (b"RCPT TO:<Postmaster>", {"path": "Postmaster"}),
    (b"RCPT TO:<POSTMASTER>", {"path": "POSTMASTER"}),
    (b"RCPT TO:<postmaster@example.net>", {"domain": "example.net"}),
    (b'RCPT TO:<"info@"@example.net>', {"path": '"info@"@example.net'}),
    (b'RCPT TO:<"a b"@example.net>', {"path": '"a b"@example.net', "domain": "example.net"}),
    (b'RCPT TO:<""@example.net>', {"path": '""@example.net'}),
    (b"RCPT TO:<rcpt@[192.0.2.30]>", {"domain": "[192.0.2.30]"}),
    (b"RCPT TO:<rcpt@[IPv6:2001:db8::30]>", {"domain": "[IPv6:2001:db8::30]"}),
    (b"RCPT TO:<rcpt@[127.0.0.1]>", {"domain": "[127.0.0.1]"}),
    (b"RCPT TO:<rcpt@[0.0.0.0]>", {"domain": "[0.0.0.0]"}),
    (b"RCPT TO:<@hop.example:rcpt@example.net>", {"path": "rcpt@example.net"}),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=SUCCESS,FAILURE", {"notify": ("SUCCESS", "FAILURE")}),
    (b"RCPT TO: <rcpt@example.net> NOTIFY=SUCCESS,FAILURE",
     {"path": "rcpt@example.net", "notify": ("SUCCESS", "FAILURE")}),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=NEVER", {"notify": ("NEVER",)}),
    (b"RCPT TO:<rcpt@example.net> notify=delay", {"notify": ("DELAY",)}),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=FAILURE,DELAY,SUCCESS",
     {"notify": ("FAILURE", "DELAY", "SUCCESS")}),
    (b"RCPT TO:<rcpt@example.net> ORCPT=rfc822;rcpt+40example.net",
     {"orcpt": ("rfc822", "rcpt@example.net")}),
    (b"RCPT TO:<rcpt@example.net> ORCPT=rfc822;rcpt@example.net",
     {"orcpt": ("rfc822", "rcpt@example.net")}),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=FAILURE ORCPT=rfc822;a+2Bb@example.net",
     {"notify": ("FAILURE",), "orcpt": ("rfc822", "a+b@example.net")}),
]
# fmt: on

# fmt: off
INVALID: list[tuple[bytes, tuple[int, str]]] = [
    # Unknown commands (500 5.5.1).
    (b"", (500, "5.5.1")),
    (b" ", (500, "5.5.1")),
    (b"FOO", (500, "5.5.1")),
    (b"MAILFROM:<a@example.com>", (500, "5.5.1")),
    (b"MAIL\tFROM:<a@example.com>", (500, "5.5.1")),
    (b" MAIL FROM:<a@example.com>", (500, "5.5.1")),
    (b"\xc0MAIL FROM:<sender@example.com>", (500, "5.5.1")),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", (500, "5.5.1")),
    (b"\x03\x00\x00\x13\x0e\xe0\x00\x00\x00\x00\x00\x01\x00\x08\x00\x03\x00\x00\x00", (500, "5.5.1")),
    (b"GET / HTTP/1.1", (500, "5.5.1")),
    (b"STARTTLSX", (500, "5.5.1")),
    (b"TURN", (500, "5.5.1")),
    (b"\x00", (500, "5.5.1")),
    # Control characters and invalid UTF-8 outside paths (501 5.5.2).
    (b"EHLO client.example.com\rX-Evil: 1", (501, "5.5.2")),
    (b"EHLO host.example.com\nIP", (501, "5.5.2")),
    (b"EHLO a\x00b", (501, "5.5.2")),
    (b"NOOP \x7f", (501, "5.5.2")),
    (b"EHLO \xff\xfe", (501, "5.5.2")),
    (b"MAIL FROM:<sender@example.com\rX-Injected: yes>", (501, "5.5.2")),
    (b"RCPT TO:<rcpt@example.net\rBcc: x@example.org>", (501, "5.5.2")),
    (b"MAIL FROM:<a@example.com>\tSIZE=1", (501, "5.5.2")),
    (b"RCPT TO:<rcpt@example.net>\r", (501, "5.5.2")),
    # Argument rules per verb (501 5.5.4).
    (b"EHLO", (501, "5.5.4")),
    (b"EHLO   ", (501, "5.5.4")),
    (b"HELO", (501, "5.5.4")),
    (b"VRFY", (501, "5.5.4")),
    (b"EXPN", (501, "5.5.4")),
    (b"DATA now", (501, "5.5.4")),
    (b"RSET all", (501, "5.5.4")),
    (b"QUIT now", (501, "5.5.4")),
    (b"STARTTLS please", (501, "5.5.4")),
    (b"AUTH", (501, "5.5.4")),
    (b"AUTH PLAIN a b", (501, "5.5.4")),
    (b"AUTH PL@IN", (501, "5.5.4")),
    (b"AUTH " + b"A" * 21, (501, "5.5.4")),
    (b"BDAT", (501, "5.5.4")),
    (b"BDAT x", (501, "5.5.4")),
    (b"BDAT -1", (501, "5.5.4")),
    (b"BDAT 10 FIRST", (501, "5.5.4")),
    (b"BDAT 10 LAST x", (501, "5.5.4")),
    (b"BDAT 10LAST", (501, "5.5.4")),
    (b"MAIL", (501, "5.5.4")),
    (b"MAIL TO:<a@example.com>", (501, "5.5.4")),
    (b"MAIL FROM<a@example.com>", (501, "5.5.4")),
    (b"MAIL FRM:<a@example.com>", (501, "5.5.4")),
    (b"RCPT", (501, "5.5.4")),
    (b"RCPT FROM:<a@example.com>", (501, "5.5.4")),
    (b"RCPT TO<a@example.com>", (501, "5.5.4")),
    # Bad sender syntax (501 5.1.7).
    (b"MAIL FROM:", (501, "5.1.7")),
    (b"MAIL FROM:   ", (501, "5.1.7")),
    (b"MAIL FROM:<", (501, "5.1.7")),
    (b"MAIL FROM:<sender@example.com", (501, "5.1.7")),
    (b"MAIL FROM:sender@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<>x", (501, "5.1.7")),
    (b"MAIL FROM:<>SIZE=5", (501, "5.1.7")),
    (b"MAIL FROM:<sender@example.com>SIZE=5", (501, "5.1.7")),
    (b"MAIL FROM:<<sender@example.com>>", (501, "5.1.7")),
    (b'MAIL FROM:<">', (501, "5.1.7")),
    (b'MAIL FROM:<"abc@example.com>', (501, "5.1.7")),
    (b"MAIL FROM:<;sleep 66;>", (501, "5.1.7")),
    (b"MAIL FROM:<sender>", (501, "5.1.7")),
    (b"MAIL FROM:<postmaster>", (501, "5.1.7")),
    (b"MAIL FROM:<@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<sender@>", (501, "5.1.7")),
    (b"MAIL FROM:<a b@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<.a@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<a.@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<a..b@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<a@b@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<a(comment)@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<a@-example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<a@example-.com>", (501, "5.1.7")),
    (b"MAIL FROM:<a@example..com>", (501, "5.1.7")),
    (b"MAIL FROM:<a@example.com.>", (501, "5.1.7")),
    (b"MAIL FROM:<a@.example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<a@exa_mple.com>", (501, "5.1.7")),
    (b"MAIL FROM:<a@" + b"a" * 64 + b".example>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[192.0.2.300]>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[192.0.2]>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[192.0.2.1.5]>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[1920.0.2.1]>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[IPv6:2001:db8::zz]>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[IPv6:fe80::1%eth0]>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[IPv6:192.0.2.1]>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[X-TAG:anything]>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[192.0.2.1>", (501, "5.1.7")),
    (b"MAIL FROM:<a@[192.0.2.30].example.com>", (501, "5.1.7")),
    (b'MAIL FROM:<"a\\\xc3\xa9"@example.com> SMTPUTF8', (501, "5.1.7")),
    (b"MAIL FROM:<@relay.example sender@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<@relay.example,sender@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<sender@example.com>x", (501, "5.1.7")),
    (b"MAIL FROM:<" + b"a" * 250 + b"@example.com>", (501, "5.1.7")),
    (b"MAIL FROM:<s\xe9nder@example.com> SMTPUTF8", (501, "5.1.7")),
    (b"MAIL FROM:<s\xc3nder@example.com> SMTPUTF8", (501, "5.1.7")),
    # Bad recipient syntax (501 5.1.3).
    (b"RCPT TO:", (501, "5.1.3")),
    (b"RCPT TO:<>", (501, "5.1.3")),
    (b"RCPT TO:<rcpt>", (501, "5.1.3")),
    (b"RCPT TO:<;id;@example.net>", (501, "5.1.3")),
    (b"RCPT TO:<postmaster@>", (501, "5.1.3")),
    (b"RCPT TO:<rcpt@example..net>", (501, "5.1.3")),
    (b"RCPT TO:<rcpt@" + b"a" * 64 + b".example>", (501, "5.1.3")),
    (b"RCPT TO:<rcpt@[192.0.2.300]>", (501, "5.1.3")),
    (b"RCPT TO:<rcpt@[192.0.2.30].example.com>", (501, "5.1.3")),
    (b"RCPT TO:<rcpt@example.net", (501, "5.1.3")),
    (b"RCPT TO:<postmaster> <x>", (501, "5.5.4")),
    (b'RCPT TO:<"unterminated@example.net>', (501, "5.1.3")),
    (b"RCPT TO:<" + b"r" * 250 + b"@example.net>", (501, "5.1.3")),
    (b"RCPT TO:r" + b"r" * 245 + b"@example.net", (501, "5.1.3")),
    # SMTPUTF8 is a MAIL parameter only (RFC 6531 section 3.4).
    (b"RCPT TO:<r\xe9@example.net> SMTPUTF8", (555, "5.5.4")),
    (b"RCPT TO:<r\xc3\xa9@example.net> SMTPUTF8", (555, "5.5.4")),
    # Non-ASCII without SMTPUTF8 (553 5.6.7).
    (b"MAIL FROM:<s\xc3\xa9nder@example.com>", (553, "5.6.7")),
    (b"MAIL FROM:<sender@b\xc3\xbccher.example>", (553, "5.6.7")),
    (b"MAIL FROM:<s\xe9nder@example.com>", (553, "5.6.7")),
    # A RCPT path is checked against its transaction's SMTPUTF8 by the session.
    (b"RCPT TO:<r\xe9@example.net>", (501, "5.1.3")),
    (b"MAIL FROM:<s\xc3\xa9nder@example.com> SIZE=10", (553, "5.6.7")),
    # Parameters (RFC 1870, 6152, 3461, 4954).
    (b"MAIL FROM:<a@example.com> SIZE=abc", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> SIZE=", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> SIZE", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> SIZE=-1", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> SIZE=1e6", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> SIZE=10 SIZE=20", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> BODY=8BITMIME BODY=7BIT", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> body=7bit BODY=7BIT", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> BODY=9BIT", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> BODY", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> SMTPUTF8=yes", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> RET=ALL", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> ENVID=a+2", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> ENVID=a+ZZ", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> ENVID=a+0Db", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> ENVID=" + b"x" * 101, (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> AUTH=sender+40example.com+0Ainjected", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> AUTH=a+00b", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> SIZE=10=20", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> -SIZE=10", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> SIZE=\xc3\xa9", (501, "5.5.4")),
    (b"MAIL FROM:<a@example.com> FOO=bar", (555, "5.5.4")),
    (b"MAIL FROM:<a@example.com> NOTIFY=NEVER", (555, "5.5.4")),
    (b"MAIL FROM:<a@example.com> ORCPT=rfc822;a@example.com", (555, "5.5.4")),
    (b"MAIL FROM:<a@example.com> X-UNKNOWN", (555, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> SIZE=10", (555, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> BODY=8BITMIME", (555, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> FOO", (555, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=NEVER,SUCCESS", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=SOMETIMES", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=SUCCESS,SUCCESS", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> NOTIFY", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=SUCCESS NOTIFY=FAILURE", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> ORCPT=rcpt@example.net", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> ORCPT=;rcpt@example.net", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> ORCPT=rfc822;", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> ORCPT=rfc822;a+0D+0ARCPT+20TO:<x@example.org>",
     (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> NOTIFY=FAILURE "
     b"ORCPT=rfc822;rcpt+40example.net+0D+0AX-Evil:+201", (501, "5.5.4")),
    (b"RCPT TO:<rcpt@example.net> ORCPT=rfc822;" + b"x" * 500, (501, "5.5.4")),
]
# fmt: on


def test_table_size() -> None:
    assert len(VALID) + len(INVALID) >= 150


@pytest.mark.parametrize(("line", "expected"), VALID, ids=[repr(r[0][:60]) for r in VALID])
def test_valid_command(line: bytes, expected: OK) -> None:
    command = parse_command(line)
    for name, value in expected.items():
        assert getattr(command, name) == value, name


@pytest.mark.parametrize(("line", "expected"), INVALID, ids=[repr(r[0][:60]) for r in INVALID])
def test_invalid_command(line: bytes, expected: tuple[int, str]) -> None:
    with pytest.raises(SMTPError) as caught:
        parse_command(line)
    assert (caught.value.code, caught.value.enhanced) == expected


def test_error_reply_line() -> None:
    with pytest.raises(SMTPError) as caught:
        parse_command(b"FOO")
    reply = caught.value.reply()
    assert reply.startswith(b"500 5.5.1 ")
    assert reply.endswith(b"\r\n")
    assert reply.count(b"\r\n") == 1
    assert caught.value.permanent


def test_error_text_excludes_input() -> None:
    with pytest.raises(SMTPError) as caught:
        parse_command(b"MAIL FROM:<evil\rX-Injected: yes@example.com>")
    assert b"evil" not in caught.value.reply()
    assert b"X-Injected" not in caught.value.reply()


SAMPLE_LINES = {
    "HELO": b"HELO x", "EHLO": b"EHLO x", "MAIL": b"MAIL FROM:<>",
    "RCPT": b"RCPT TO:<postmaster>", "DATA": b"DATA", "RSET": b"RSET", "VRFY": b"VRFY x",
    "EXPN": b"EXPN x", "HELP": b"HELP", "NOOP": b"NOOP", "QUIT": b"QUIT",
    "STARTTLS": b"STARTTLS", "AUTH": b"AUTH PLAIN", "BDAT": b"BDAT 1",
}


def test_verbs_listed() -> None:
    assert VERBS == set(SAMPLE_LINES)
    for verb, line in SAMPLE_LINES.items():
        assert parse_command(line).verb == verb
        assert parse_command(line.lower()).verb == verb


def test_path_limit_boundary() -> None:
    # MAX_PATH counts the angle brackets: 254 octets of mailbox fit exactly.
    domain = b"@" + b"d" * 60 + b"." + b"e" * 60 + b"." + b"f" * 60
    local = b"l" * (MAX_PATH - 2 - len(domain))
    command = parse_command(b"MAIL FROM:<" + local + domain + b">")
    assert command.path is not None
    assert len(command.path) == MAX_PATH - 2
    with pytest.raises(SMTPError) as caught:
        parse_command(b"MAIL FROM:<l" + local + domain + b">")
    assert caught.value.code == 501


def test_params_keep_raw_values() -> None:
    command = parse_command(b"MAIL FROM:<a@example.com> ENVID=a+2Bb SMTPUTF8 size=7")
    assert command.params == {"ENVID": "a+2Bb", "SMTPUTF8": None, "SIZE": "7"}
    assert command.envid == "a+b"


def test_params_empty_for_other_verbs() -> None:
    assert parse_command(b"NOOP").params == {}


def test_argument_of_lenient_mail() -> None:
    command = parse_command(b"MAIL FROM: <sender@example.com> SIZE=5")
    assert command.argument == "FROM: <sender@example.com> SIZE=5"
    assert command.path == "sender@example.com"


@pytest.mark.parametrize(
    "value",
    ["", "plain", "a+b=c", "with space", "caf\u00e9", "<>", "+", "=", "~!", "\u4f8b"],
)
def test_xtext_round_trip(value: str) -> None:
    encoded = xtext_encode(value)
    assert encoded.isascii()
    assert " " not in encoded
    assert "=" not in encoded
    assert xtext_decode(encoded) == value


@pytest.mark.parametrize("value", ["a+0A", "a+0D", "+00", "a+7F", "a+", "a+G0", "a b", "\u00e9"])
def test_xtext_decode_rejects(value: str) -> None:
    with pytest.raises(SMTPError) as caught:
        xtext_decode(value)
    assert (caught.value.code, caught.value.enhanced) == (501, "5.5.4")


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        # Unicode spaces are no separators: str.split() left no word here, and
        # reading the first one crashed the worker.
        (b"AUTH \xc2\xa0", "501 5.5.4"),
        (b"AUTH \xe3\x80\x80", "501 5.5.4"),
        (b"AUTH PLAIN\xc2\xa0dGVzdA==", "501 5.5.4"),
        # RFC 1870: at most 20 digits.  int() refuses more than 4300.
        (b"MAIL FROM:<a@example.com> SIZE=" + b"9" * 21, "501 5.5.4"),
        (b"MAIL FROM:<a@example.com> SIZE=" + b"9" * 5000, "501 5.5.4"),
    ],
)
def test_hostile_arguments_rejected(line: bytes, reply: str) -> None:
    with pytest.raises(SMTPError) as raised:
        parse_command(line)
    assert f"{raised.value.code} {raised.value.enhanced}" == reply


def test_twenty_digit_size_parsed() -> None:
    assert parse_command(b"MAIL FROM:<a@example.com> SIZE=" + b"9" * 20).size == 10**20 - 1
    assert parse_command(b"BDAT " + b"1" * 20 + b" LAST").chunk_size == int("1" * 20)
    # Longer BDAT sizes count as 10**20, which the session rejects as too big.
    assert parse_command(b"BDAT " + b"9" * 4400 + b" LAST").chunk_size == 10**20
    # Leading zeros do not count towards the 20 digits.
    assert parse_command(b"BDAT " + b"0" * 4400 + b"12 LAST").chunk_size == 12
    assert parse_command(b"BDAT " + b"0" * 30).chunk_size == 0
    assert parse_command(b"BDAT 0" + b"1" * 21).chunk_size == 10**20
