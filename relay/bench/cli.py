"""Subcommands ``relay bench`` (SMTP load generator) and ``relay sink`` (counting sink).

``relay bench HOST:PORT`` prints a summary, or one JSON object with
``--json``.  It exits 1 when any message failed (0 with ``--allow-errors``),
2 on a usage error and 0 otherwise.  A first Ctrl-C (SIGINT) stops the run,
prints what was measured so far, marked interrupted, and exits 130; a
second one exits 130 at once.  Without ``--messages``
or ``--duration`` a run sends ``DEFAULT_MESSAGES`` messages, because a run
is never unbounded.  ``relay sink`` runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import math
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import orjson

from relay.bench.client import ClientSettings
from relay.bench.faults import FaultPlan
from relay.bench.loadgen import LoadPlan, ProgressLine, run_load
from relay.bench.messages import AddressPattern, encode, generate_message, load_folder
from relay.bench.sink import DEFAULT_MAX_UNSENT_REPLIES, SinkSettings
from relay.bench.sink import DEFAULT_TIMEOUT as DEFAULT_SINK_TIMEOUT
from relay.bench.sink_server import SinkRun, run_sink
from relay.bench.stats import format_report
from relay.config import MAX_WORKERS
from relay.log import setup_logging
from relay.units import format_host_port, is_hostname, parse_host_port, parse_size

# Messages a run sends when neither --messages nor --duration is given.
DEFAULT_MESSAGES = 1000
# One hour: any longer delay outlasts every client timeout.
MAX_SINK_DELAY_MS = 3_600_000
# 1 GiB: far above any useful bound on one connection's unsent replies.
MAX_UNSENT_REPLIES = 1 << 30
# Largest --size.  The run keeps about four copies of the generated message
# while it encodes it (1.1 GB peak resident memory for --size 256M, measured
# with /usr/bin/time), so this costs about 4 GB.  It is about 100 times Postfix's
# default message_size_limit (10240000 in Postfix 3.7).
MAX_GENERATED_SIZE = 1024 * 1024 * 1024
# Largest --concurrency.  Every connection goes from one source address to
# the same address and port, so each needs its own 16-bit source port.  The
# kernel's ephemeral range (net.ipv4.ip_local_port_range) usually allows fewer.
MAX_CONCURRENCY = 65535
# Seconds to wait for each reply; RFC 5321 section 4.5.3.2 allows servers
# minutes, but a benchmark that waits that long has already failed.
DEFAULT_TIMEOUT = 30.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` and ``sink`` subcommands."""
    _register_bench(subparsers)
    _register_sink(subparsers)


def _register_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="generate SMTP load and report throughput and latency",
        description="Send mail to an SMTP server and report messages per second and latency percentiles.",
    )
    bench.add_argument("target", metavar="HOST:PORT", help="SMTP server to load, e.g. 127.0.0.1:2525")
    load = bench.add_argument_group("load")
    load.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=10,
        metavar="N",
        help=f"concurrent connections, at most {MAX_CONCURRENCY} (default: 10)",
    )
    load.add_argument(
        "-n",
        "--messages",
        type=int,
        metavar="N",
        help=f"messages to send in total (default: {DEFAULT_MESSAGES} without --duration)",
    )
    load.add_argument(
        "-d", "--duration", type=float, metavar="SECONDS", help="start no message after this many seconds"
    )
    load.add_argument(
        "-m",
        "--per-connection",
        type=int,
        default=1,
        metavar="N",
        help="messages per connection before QUIT; 0 keeps connections open for the whole run (default: 1)",
    )
    load.add_argument(
        "--rate",
        type=float,
        metavar="MSG/S",
        help="open loop: start messages at this rate; latency counts from each due time (default: unpaced)",
    )
    load.add_argument(
        "-P",
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="client processes sharing the connections (default: 1)",
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"wait at most this long for each reply (default: {DEFAULT_TIMEOUT:g})",
    )

    mail = bench.add_argument_group("messages")
    mail.add_argument(
        "-s",
        "--size",
        default="1K",
        metavar="OCTETS",
        help="size of the generated message, from the size of its headers (224 with the default addresses) to 1G;"
        " suffix K, M or G allowed (default: 1K)",
    )
    mail.add_argument(
        "--message-dir", metavar="DIR", help="send the files of this folder in turn instead of a generated message"
    )
    mail.add_argument(
        "-r", "--recipients", type=int, default=1, metavar="N", help="recipients per message (default: 1)"
    )
    mail.add_argument(
        "--from",
        dest="sender",
        default="bench{n}@example.test",
        metavar="PATTERN",
        help="sender; {n} is the message number (default: bench{n}@example.test)",
    )
    mail.add_argument(
        "--to",
        dest="recipient",
        default="rcpt{r}@example.test",
        metavar="PATTERN",
        help="recipient; {n} message number, {r} recipient index (default: rcpt{r}@example.test)",
    )
    mail.add_argument(
        "--helo", default="bench.example.test", metavar="NAME", help="EHLO name (default: bench.example.test)"
    )

    protocol = bench.add_argument_group("protocol")
    protocol.add_argument(
        "--no-pipelining", action="store_true", help="wait for each reply even when the server offers PIPELINING"
    )
    protocol.add_argument(
        "--bdat", action="store_true", help="send each message as one BDAT LAST chunk instead of DATA"
    )
    protocol.add_argument("--starttls", action="store_true", help="require STARTTLS before sending mail")
    protocol.add_argument(
        "--tls-no-verify", action="store_true", help="accept any server certificate (for self-signed test servers)"
    )
    protocol.add_argument("--tls-ca", metavar="FILE", help="trust the CA certificates in this PEM file")
    protocol.add_argument("--auth-user", metavar="USER", help="authenticate as USER with AUTH PLAIN or LOGIN")
    protocol.add_argument("--auth-password-file", metavar="FILE", help="file whose first line is the AUTH password")

    output = bench.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the results as one JSON object")
    output.add_argument("--allow-errors", action="store_true", help="exit 0 even when some messages failed")
    bench.set_defaults(handler=_bench)


def _register_sink(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sink = subparsers.add_parser(
        "sink",
        help="accept every message and discard it, counting",
        description="Accept and discard mail, counting it; optionally inject failures to test a client's retry logic.",
    )
    sink.add_argument(
        "--listen", default="127.0.0.1:2525", metavar="HOST:PORT", help="address to listen on (default: 127.0.0.1:2525)"
    )
    sink.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the port with SO_REUSEPORT (default: 1)",
    )
    sink.add_argument(
        "--hostname",
        default="sink.localdomain",
        metavar="NAME",
        help="name in the greeting and EHLO reply (default: sink.localdomain)",
    )
    sink.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="STAGE:KIND=P",
        help="with probability P, reply to STAGE (connect, mail, rcpt, data) with KIND (4xx, 5xx, drop); repeatable",
    )
    sink.add_argument(
        "--delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="delay every reply by this many milliseconds (default: 0)",
    )
    sink.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_SINK_TIMEOUT,
        metavar="SECONDS",
        help="close a connection with 421 4.4.2 after this many seconds without input,"
        f" also inside DATA or BDAT (default: {DEFAULT_SINK_TIMEOUT:g})",
    )
    sink.add_argument(
        "--max-unsent-replies",
        default=str(DEFAULT_MAX_UNSENT_REPLIES),
        metavar="SIZE",
        help="stop reading from a connection while its unsent replies exceed this many octets; suffix K, M or G"
        f" allowed, from 1 to 1G (default: {DEFAULT_MAX_UNSENT_REPLIES})",
    )
    sink.add_argument(
        "--seed", type=int, metavar="N", help="seed of the fault draws, for repeatable runs (worker i uses N+i)"
    )
    sink.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain; with --tls-key, offer STARTTLS")
    sink.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    sink.add_argument("--json", action="store_true", help="print counters as JSON objects")
    sink.set_defaults(handler=_sink)


def _usage_error(message: str, command: str = "bench") -> int:
    print(f"relay {command}: {message}", file=sys.stderr)
    return 2


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=args.tls_ca)
    if args.tls_no_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _bench(args: argparse.Namespace) -> int:
    try:
        host, port = parse_host_port(args.target)
    except ValueError as exc:
        return _usage_error(f"bench target: {exc}")
    for name in ("concurrency", "processes", "recipients"):
        if getattr(args, name) < 1:
            return _usage_error(f"--{name}: {getattr(args, name)} is below the minimum 1")
    if args.per_connection < 0:
        return _usage_error(f"--per-connection: {args.per_connection} is negative; use 0 for unlimited")
    if args.messages is not None and args.messages < 1:
        return _usage_error(f"--messages: {args.messages} is below the minimum 1")
    if args.concurrency > MAX_CONCURRENCY:
        return _usage_error(
            f"--concurrency: {args.concurrency} is above the maximum {MAX_CONCURRENCY}, the number of TCP source ports"
        )
    if args.processes > MAX_WORKERS:
        return _usage_error(f"--processes: {args.processes} is above the maximum {MAX_WORKERS}")
    # The range checks also reject NaN, which fails every comparison, and inf, which never ends.
    if args.duration is not None and not (0 < args.duration < math.inf):
        return _usage_error(f"--duration: {args.duration:g} must be a finite number of seconds above 0")
    if args.rate is not None and not (0 < args.rate < math.inf):
        return _usage_error(f"--rate: {args.rate:g} must be a finite number of messages per second above 0")
    if args.rate is not None and args.duration is not None and not math.isfinite(args.rate * args.duration):
        return _usage_error(
            f"--rate {args.rate:g} for --duration {args.duration:g}: the number of messages is not finite;"
            " lower one of them"
        )
    if not (0 < args.timeout < math.inf):
        return _usage_error(f"--timeout: {args.timeout:g} must be a finite number of seconds above 0")
    if args.processes > args.concurrency:
        return _usage_error(
            f"--processes {args.processes} exceeds --concurrency {args.concurrency}; each process needs a connection"
        )
    if (args.auth_user is None) != (args.auth_password_file is None):
        return _usage_error("--auth-user and --auth-password-file go together; give both or neither")
    if (args.tls_no_verify or args.tls_ca) and not args.starttls:
        return _usage_error("--tls-no-verify and --tls-ca need --starttls")

    try:
        sender = AddressPattern(args.sender)
    except ValueError as exc:
        return _usage_error(f"--from: {exc}")
    try:
        recipient = AddressPattern(args.recipient)
    except ValueError as exc:
        return _usage_error(f"--to: {exc}")
    if not (is_hostname(args.helo) or (args.helo.startswith("[") and args.helo.endswith("]"))):
        return _usage_error(f"--helo {args.helo!r}: not a host name; give a name such as bench.example.test")

    password = None
    if args.auth_password_file is not None:
        try:
            password = Path(args.auth_password_file).read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            return _usage_error(f"--auth-password-file {args.auth_password_file}: cannot read a password line ({exc})")

    if args.message_dir is not None:
        try:
            raw_messages = load_folder(Path(args.message_dir))
        except OSError as exc:
            where = exc.filename or args.message_dir
            return _usage_error(f"--message-dir {args.message_dir}: cannot read {where}: {exc.strerror}")
        except ValueError as exc:
            return _usage_error(f"--message-dir: {exc}")
    else:
        try:
            size = parse_size(args.size)
        except ValueError as exc:
            return _usage_error(f"--size: {exc}")
        if size > MAX_GENERATED_SIZE:
            return _usage_error(
                f"--size: {args.size} is above the maximum 1G; for larger messages use --message-dir with files"
                " of that size"
            )
        try:
            raw_messages = [generate_message(size, sender.format(0), recipient.format(0))]
        except ValueError as exc:
            return _usage_error(f"--size {args.size}: {exc}")

    try:
        tls_context = _tls_context(args) if args.starttls else None
    except (OSError, ssl.SSLError) as exc:
        return _usage_error(f"--tls-ca {args.tls_ca}: cannot load ({exc})")

    # Resolved once here, so that name lookups neither add to the connect
    # latency nor repeat for every connection.
    # NOTE: only the first address is used, even when the name has several.
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return _usage_error(
            f"bench target {args.target}: cannot resolve {host} ({exc.strerror}); give an IP address"
            " or a name that resolves"
        )
    address = str(resolved[0][4][0])

    settings = ClientSettings(
        host=host,
        port=port,
        address=address,
        helo=args.helo,
        sender=sender,
        recipient=recipient,
        recipients=args.recipients,
        pipelining=not args.no_pipelining,
        bdat=args.bdat,
        starttls=args.starttls,
        tls_context=tls_context,
        auth_user=args.auth_user,
        auth_password=password,
        timeout=args.timeout,
    )
    count = args.messages
    if count is None and args.duration is None:
        count = DEFAULT_MESSAGES
    plan = LoadPlan(
        settings=settings,
        messages=tuple(encode(message) for message in raw_messages),
        concurrency=args.concurrency,
        count=count,
        duration=args.duration,
        per_connection=args.per_connection,
        rate=args.rate,
    )

    progress = ProgressLine(sys.stderr, enabled=sys.stderr.isatty())
    stats = run_load(plan, args.processes, progress)
    report = stats.report()
    report["settings"] = _settings_report(args, host, port, count, plan)
    if args.json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
    else:
        print(format_report(report))
    if stats.interrupted:
        # 128 + SIGINT, as a shell reports a command that Ctrl-C stopped.
        return 130
    if stats.messages_failed and not args.allow_errors:
        return 1
    return 0


def _settings_report(
    args: argparse.Namespace, host: str, port: int, count: int | None, plan: LoadPlan
) -> dict[str, Any]:
    """Return the settings of a run for its JSON report, so that a stored report shows what was measured."""
    generated = args.message_dir is None
    return {
        "target": format_host_port(host, port),
        "concurrency": args.concurrency,
        "processes": args.processes,
        "messages": count,
        "duration_s": args.duration,
        "per_connection": args.per_connection,
        "rate": args.rate,
        "timeout_s": args.timeout,
        "message_octets": plan.messages[0].octets if generated else None,
        "message_dir": None if generated else args.message_dir,
        "message_files": len(plan.messages),
        "recipients": args.recipients,
        "pipelining": not args.no_pipelining,
        "bdat": args.bdat,
        "starttls": args.starttls,
        "auth": args.auth_user is not None,
    }


def _sink(args: argparse.Namespace) -> int:
    try:
        host, port = parse_host_port(args.listen)
    except ValueError as exc:
        return _usage_error(f"--listen: {exc}", "sink")
    if args.workers < 1:
        return _usage_error(f"--workers: {args.workers} is below the minimum 1", "sink")
    if args.workers > MAX_WORKERS:
        return _usage_error(f"--workers: {args.workers} is above the maximum {MAX_WORKERS}", "sink")
    # NaN fails every comparison, so it is tested first; inf would never reply.
    if not math.isfinite(args.delay) or not 0 <= args.delay <= MAX_SINK_DELAY_MS:
        return _usage_error(f"--delay: {args.delay:g} is not between 0 and {MAX_SINK_DELAY_MS} milliseconds", "sink")
    if not (0 < args.timeout < math.inf):
        return _usage_error(f"--timeout: {args.timeout:g} must be a finite number of seconds above 0", "sink")
    if not is_hostname(args.hostname):
        return _usage_error(
            f"--hostname {args.hostname!r}: not a host name; give a name such as sink.example.test", "sink"
        )
    try:
        max_unsent_replies = parse_size(args.max_unsent_replies)
    except ValueError as exc:
        return _usage_error(f"--max-unsent-replies: {exc}", "sink")
    if max_unsent_replies < 1:
        return _usage_error(f"--max-unsent-replies: {max_unsent_replies} is below the minimum 1 octet", "sink")
    if max_unsent_replies > MAX_UNSENT_REPLIES:
        return _usage_error(
            f"--max-unsent-replies: {max_unsent_replies} is above the maximum {MAX_UNSENT_REPLIES} octets (1G)",
            "sink",
        )
    try:
        faults = FaultPlan.from_specs(args.fault, args.seed)
    except ValueError as exc:
        return _usage_error(f"--fault: {exc}", "sink")
    if (args.tls_cert is None) != (args.tls_key is None):
        return _usage_error("--tls-cert and --tls-key go together; give both or neither", "sink")
    tls_context = None
    if args.tls_cert is not None:
        tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls_context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls_context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(
                f"relay sink: cannot load --tls-cert {args.tls_cert} / --tls-key {args.tls_key}: {exc}",
                file=sys.stderr,
            )
            return 1

    setup_logging("text")
    settings = SinkSettings(
        hostname=args.hostname,
        faults=faults,
        delay=args.delay / 1000,
        timeout=args.timeout,
        tls_context=tls_context,
        max_unsent_replies=max_unsent_replies,
    )
    run = SinkRun(host=host, port=port, workers=args.workers, settings=settings, json_output=args.json)
    try:
        return run_sink(run)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            # The words of relay serve's error, because the cause and the fix are the same.
            print(
                f"relay sink: listener {format_host_port(host, port)} is already in use by another process;"
                " stop that process or choose another address",
                file=sys.stderr,
            )
        else:
            print(f"relay sink: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
