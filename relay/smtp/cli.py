"""Subcommands ``relay serve`` and ``relay passwd``.

``serve`` runs the listeners of the config (``--listen`` and ``--spool``
replace the listeners and the spool directory for quick use).  ``relay
sink`` lives in ``relay.bench``.  ``passwd`` adds or changes one AUTH credential, reading the
password from the terminal without echo, or as one line from standard input
when that is not a terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import signal
import sys

from relay.cli import add_config_option, config_from_args
from relay.config import MAX_WORKERS, Config, ListenerConfig, locate_error
from relay.entry import SERVE_SIGNALS
from relay.log import setup_logging
from relay.smtp.auth import CredentialsError, check_user_name, set_password
from relay.units import parse_host_port

EVENT_LOOPS = ("uvloop", "asyncio")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser("serve", help="run the relay: receive mail over SMTP, spool it and deliver it")
    add_config_option(serve)
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="listen here only (role mx, no TLS) instead of the configured listeners",
    )
    serve.add_argument("--spool", metavar="DIR", help="spool directory (overrides [spool] path)")
    serve.add_argument(
        "--no-delivery",
        action="store_true",
        help="receive and spool only, with no delivery (sets [delivery] enabled = false)",
    )
    _add_common(serve)
    serve.set_defaults(handler=_serve)

    passwd = subparsers.add_parser("passwd", help="add or change an AUTH credential in a password file")
    passwd.add_argument(
        "file",
        metavar="FILE",
        help="credentials file; created with mode 0600 if missing, else rewritten keeping its mode, owner and group",
    )
    passwd.add_argument("user", metavar="USER", help="user name to add or change")
    passwd.set_defaults(handler=_passwd)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, metavar="N", help="worker processes (overrides [server] workers)")
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="event loop implementation (default: uvloop; asyncio is the standard library's)",
    )


def _listen_address(value: str) -> tuple[str, int]:
    try:
        return parse_host_port(value)
    except ValueError as exc:
        print(f"relay serve: --listen: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _apply_workers(config: Config, workers: int | None) -> Config:
    if workers is None:
        return config
    if workers < 1:
        print(f"relay serve: --workers: {workers} is below the minimum 1", file=sys.stderr)
        raise SystemExit(2)
    if workers > MAX_WORKERS:
        print(f"relay serve: --workers: {workers} is above the maximum {MAX_WORKERS}", file=sys.stderr)
        raise SystemExit(2)
    return config.replace(server=dataclasses.replace(config.server, workers=workers))


def _run(config: Config, event_loop: str) -> int:
    from relay.reload import FileCheckError
    from relay.smtp.server import StartupError, serve

    setup_logging(config.log.format, config.log.level)
    try:
        return serve(config, event_loop=event_loop)
    except StartupError as exc:
        # An error about a config value names where the value came from, as relay check-config does.
        if exc.key is None:
            print(f"relay serve: {exc}", file=sys.stderr)
        else:
            print(locate_error(config, f"{exc.key}: {exc}"), file=sys.stderr)
        return 1
    except FileCheckError as exc:
        for error in exc.errors:
            print(locate_error(config, error), file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    # relay.entry blocked these already when run as the relay program; a
    # caller of main(argv) gets them blocked here.  Either way a stop or reload
    # signal waits for the handlers that the workers install, instead of
    # ending relay serve while it reads its config.
    signal.pthread_sigmask(signal.SIG_BLOCK, SERVE_SIGNALS)
    config = config_from_args(args)
    overrides = set()
    if args.listen:
        config = config.replace(listeners=(ListenerConfig(address=_listen_address(args.listen)),))
        overrides.add("listener")
    if args.spool is not None:
        if not args.spool:
            print("relay serve: --spool is empty; give the spool directory, or leave it out to use [spool] path",
                  file=sys.stderr)
            return 2
        config = config.replace(spool=dataclasses.replace(config.spool, path=args.spool))
        overrides.add("spool.path")
    if args.no_delivery:
        config = config.replace(delivery=dataclasses.replace(config.delivery, enabled=False))
        overrides.add("delivery.enabled")
    if args.workers is not None:
        overrides.add("server.workers")
    config = config.replace(overrides=frozenset(overrides))
    return _run(_apply_workers(config, args.workers), args.event_loop)


def _passwd(args: argparse.Namespace) -> int:
    # Checked before the prompts, so that no password is typed for a name that cannot be stored.
    try:
        check_user_name(args.user)
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    if sys.stdin.isatty():
        try:
            password = getpass.getpass(f"Password for {args.user}: ")
            repeated = getpass.getpass("Repeat password: ")
        except EOFError:
            # Ctrl-D at the prompt: the user gave up, as with Ctrl-C.
            print("\nrelay: no password entered; nothing changed", file=sys.stderr)
            return 1
        if repeated != password:
            print("relay: passwords do not match; nothing changed", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relay: empty password; nothing changed", file=sys.stderr)
        return 1
    try:
        added = set_password(args.file, args.user, password)
    except (ValueError, CredentialsError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relay: cannot write {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{args.file}: {'added' if added else 'changed'} {args.user}")
    return 0
