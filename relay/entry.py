"""Entry point of the ``relay`` program, kept free of heavy imports.

``relay serve`` handles SIGTERM, SIGINT and SIGHUP only once its workers
run, and importing the command line (asyncio, ssl, the config code) already
takes many times longer than starting the interpreter.  Until the handlers
are in place, the default action of each signal would end the program, so a
``systemctl reload`` right after ``systemctl start`` would stop the relay.
``main`` blocks these signals first, so that they wait, and the workers
act on them once their handlers are in place (``relay.signals``).

NOTE: the interpreter's own startup, before this module runs, is still
exposed: a SIGHUP in the first few milliseconds after exec ends the process.
"""

from __future__ import annotations

import os
import signal
import sys

# The stop and reload signals of relay serve.  The supervisor forwards the same ones to its workers.
SERVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Program names under which relay runs as sendmail(1) in one of its modes.
SENDMAIL_NAMES = ("sendmail", "mailq", "newaliases")


def main() -> int:
    """Run the relay command line, with the signals of ``relay serve`` blocked from the start."""
    # Only relay serve: another command, or sendmail (also run as mailq or
    # newaliases) given an argument "serve", keeps the default actions so
    # that Ctrl-C and a hangup end it.
    if sys.argv[1:2] == ["serve"] and os.path.basename(sys.argv[0]) not in SENDMAIL_NAMES:
        signal.pthread_sigmask(signal.SIG_BLOCK, SERVE_SIGNALS)

    from relay.cli import main as run_command_line

    return run_command_line()
