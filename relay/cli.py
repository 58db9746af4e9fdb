"""The ``relay`` command line: one subcommand per job, dispatched by argparse.

Each feature module that adds a subcommand exposes ``register(subparsers)``,
which adds its parser and sets ``handler`` to a function taking the parsed
arguments and returning the exit status.  Errors a user can fix are printed
as one line on stderr naming the value and the fix, with exit status 1
(2 for usage errors, from argparse).
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import select
import sys
from collections.abc import Sequence

from relay import __version__
from relay.config import (
    CONFIG_ENVIRONMENT,
    Config,
    ConfigError,
    config_warnings,
    load_config,
    locate_error,
    spool_directory_problem,
)
from relay.entry import SENDMAIL_NAMES
from relay.log import setup_logging

# Modules that add subcommands, in the order `relay --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "relay.smtp.cli",
    "relay.spool.cli",
    "relay.status",
    "relay.sendmail",
    "relay.bench.cli",
    "relay.delivery.mailbox_cli",
)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Add the ``--config FILE`` option that most subcommands share."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="relay.toml to read (default: the file $RELAY_CONFIG names, else built-in defaults)",
    )


# C0 control characters, DEL, the C1 control characters, the Unicode line and
# paragraph separators and the Unicode bidirectional formatting characters.
# Text from remote senders would reach the operator's terminal with them as
# escape sequences, split into two lines for readers that break lines at
# U+2028 and U+2029 (Python's str.splitlines does), or reordered for display
# (a right-to-left override shows "invoice\u202efdp.exe" as "invoiceexe.pdf").
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def escape_controls(text: str, keep: str = "") -> str:
    """Replace control characters in ``text``, except those in ``keep``, with ``\\xNN`` or ``\\uNNNN``."""

    def escape(match: re.Match[str]) -> str:
        character = match.group()
        if character in keep:
            return character
        code = ord(character)
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _CONTROL_CHARACTERS.sub(escape, text)


def stop_output() -> int:
    """Stop writing to standard output after its reader closed the pipe (``| head``); return exit status 1.

    Pointing stdout at /dev/null keeps the flush at exit from raising
    BrokenPipeError again, so the command ends without a traceback.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def stdout_reader_gone() -> bool:
    """Return whether standard output is a pipe or socket whose reading end has been closed."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(descriptor, select.POLLOUT)
    # Linux reports POLLERR on the writing end of a pipe without readers.
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config of ``--config``, else of ``$RELAY_CONFIG``; print every error and exit 1 if invalid."""
    option_path = getattr(args, "config", None)
    path = option_path or os.environ.get(CONFIG_ENVIRONMENT) or None
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        if path is not None and not option_path and not os.path.isfile(path):
            print(f"{path}: named by the {CONFIG_ENVIRONMENT} environment variable; fix or unset it", file=sys.stderr)
        raise SystemExit(1) from None


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    # The files that relay serve loads before it starts any worker.
    from relay.reload import FileCheckError, check_files

    errors: list[str] = []
    try:
        check_files(config)
    except FileCheckError as exc:
        errors.extend(exc.errors)
    # Checked without creating the spool, which relay serve opens before
    # its workers start.  relay sendmail exits 75 for it, so it is no
    # error of load_config.
    spool_problem = spool_directory_problem(config.spool.path)
    if spool_problem is not None:
        errors.append(f"spool.path: {spool_problem}")
    for error in errors:
        # "FILE:section.key: problem", as load_config and relay serve write theirs.
        print(locate_error(config, error), file=sys.stderr)
    if errors:
        return 1
    # A warning leaves the exit status 0, because the config works, only unsafely.
    for key, problem in config_warnings(config):
        print(f"{args.file}:{key}: warning: {problem}", file=sys.stderr)
    for problem in _alias_member_warnings(config):
        print(f"{args.file}:local.aliases: warning: {problem}", file=sys.stderr)
    names = ", ".join(listener.address_text for listener in config.listeners)
    print(f"{args.file}: ok ({len(config.listeners)} listener(s): {names})")
    return 0


def _alias_member_warnings(config: Config) -> list[str]:
    """Return a warning for each alias member whose mail would bounce, because it has no mailbox."""
    if not config.local.aliases:
        return []
    from relay.aliases import checked_table
    from relay.delivery.maildir import unknown_alias_members

    # check_files stored the table it parsed, so the file is not read again.
    table = checked_table(config.local.aliases) or {}
    return [
        f"alias {alias}: member {member} has no folder in local.maildir_root and is not in local.users,"
        f" so its copy of mail to {alias} bounces with 5.1.1; create {member}'s Maildir folder, add"
        f" {member} to local.users, or remove {member} from the alias"
        for alias, member in unknown_alias_members(config.local, table)
    ]


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose subcommands reject the arguments they do not know.

    argparse hands a subcommand's unknown arguments up to the top-level parser,
    which then reports them as ``relay: error:`` with the top-level usage.
    Subcommand parsers are created with the class of their parent, so each
    one rejects its own, naming the subcommand and showing its usage.
    """

    # typeshed declares overloads for custom namespace types, which this does not repeat.
    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available subcommand."""
    parser = CommandParser(
        prog="relay",
        description="relay: a mail transfer agent with a compiled SMTP core.",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = subparsers.add_parser("check-config", help="validate a config file and report every error")
    check.add_argument("file", metavar="FILE", help="path of the relay.toml to check")
    check.set_defaults(handler=_check_config)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the relay command line and return its exit status."""
    if argv is None:
        # Run as a program: warnings and errors that commands log (a record moved
        # aside, for example) go to stderr with their fields.  relay serve
        # replaces this with its config's logging.  A caller that passes argv
        # keeps its own logging setup.
        setup_logging(level="warning")
        # A terminal or pipe whose encoding cannot show an address (an ASCII
        # locale and a UTF-8 mailbox) gets an escape instead of a traceback.
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(errors="backslashreplace")

    # Installed as a `sendmail`, `mailq` or `newaliases` symlink, relay behaves
    # as sendmail(1) in that mode, with the same logging and output setup as
    # `relay sendmail`.
    program = os.path.basename(sys.argv[0])
    try:
        if argv is None and program in SENDMAIL_NAMES:
            from relay.sendmail import run

            return run(sys.argv[1:], program)

        parser = build_parser()
        args = parser.parse_args(argv)
        status: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of standard output went away (`relay status | head -1`).
        # A broken pipe elsewhere, such as a socket, is a fault to show.
        if not stdout_reader_gone():
            raise
        return stop_output()
    return status


if __name__ == "__main__":
    sys.exit(main())
