"""aiosmtpd on uvloop as a benchmark peer: a do-nothing handler or a write+fsync one.

    python benchmarks/aiosmtpd_server.py --listen 127.0.0.1:2526 --handler null
    python benchmarks/aiosmtpd_server.py --listen 127.0.0.1:2526 --handler fsync --directory DIR

``null`` replies 250 to every message and keeps nothing.  ``fsync`` writes
each message to its own file in DIR and fsyncs it before answering 250, the
least a server must do before it may acknowledge a message.  The write and
fsync run on the event loop (``--fsync-in loop``) or in the default thread
pool (``--fsync-in thread``, the default).  Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
from functools import partial
from pathlib import Path

import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session


class NullHandler:
    """Accept every message and keep nothing."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"


class FsyncHandler:
    """Write every message to a file and fsync it before replying."""

    def __init__(self, directory: Path, in_thread: bool) -> None:
        self.directory = directory
        self.in_thread = in_thread
        self.numbers = itertools.count()

    def _store(self, content: bytes) -> None:
        path = self.directory / f"{os.getpid()}-{next(self.numbers)}.eml"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, content)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if self.in_thread:
            await asyncio.get_running_loop().run_in_executor(None, self._store, content)
        else:
            self._store(content)
        return "250 2.0.0 OK"


async def serve(host: str, port: int, handler: object) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    factory = partial(SMTP, handler, hostname="aiosmtpd.localdomain")
    server = await loop.create_server(factory, host, port, backlog=4096, reuse_address=True)
    print(f"listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="loopback address to listen on")
    parser.add_argument("--handler", choices=("null", "fsync"), required=True, help="what to do with each message")
    parser.add_argument("--directory", type=Path, help="folder for the fsync handler's message files")
    parser.add_argument("--fsync-in", choices=("thread", "loop"), default="thread", help="where fsync runs")
    args = parser.parse_args()
    host, _, port_text = args.listen.rpartition(":")
    handler: object
    if args.handler == "fsync":
        if args.directory is None:
            parser.error("--handler fsync needs --directory")
        args.directory.mkdir(parents=True, exist_ok=True)
        handler = FsyncHandler(args.directory, args.fsync_in == "thread")
    else:
        handler = NullHandler()
    uvloop.run(serve(host.strip("[]"), int(port_text), handler))


if __name__ == "__main__":
    main()
