"""What ``relay serve`` logs about the messages it delivers, read back from its JSON log."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from conftest import REPO_ROOT, free_port
from tests.server_helpers import wait_for_port

CONFIG = """
[server]
hostname = "mx.example.test"
workers = 1

[[listener]]
address = "127.0.0.1:{port}"

[spool]
path = "{directory}/spool"

[policy]
local_domains = ["example.test"]

[local]
maildir_root = "{directory}/mail"
aliases = "{directory}/aliases"

[delivery]
mx_tls = "none"
minimal_backoff_time = "1s"
maximal_backoff_time = "1s"

[delivery.transport]
"remote.test" = "smtp:[127.0.0.1]:{next_hop_port}"

[log]
format = "json"

[admin]
address = ""
"""


class Serve:
    """One ``relay serve`` process whose JSON log goes to a file."""

    def __init__(self, directory: Path, next_hop_port: int) -> None:
        self.port = free_port()
        self.config = directory / "relay.toml"
        self.config.write_text(CONFIG.format(port=self.port, directory=directory, next_hop_port=next_hop_port))
        self.log_path = directory / "relay.log"

    def events(self) -> list[dict[str, Any]]:
        """Return every log line so far as a JSON object; a line that is not one fails the test."""
        lines = self.log_path.read_bytes().splitlines()
        return [orjson.loads(line) for line in lines]

    def wait_for(self, event: str, timeout: float = 20.0, **fields: Any) -> dict[str, Any]:
        """Return the first logged ``event`` with these field values, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.events():
                if line["event"] == event and all(line.get(key) == value for key, value in fields.items()):
                    return line
            assert time.monotonic() < deadline, f"no {event} {fields} logged; log:\n{self.log_path.read_text()}"
            time.sleep(0.05)


@contextmanager
def serve(directory: Path, next_hop_port: int) -> Iterator[Serve]:
    server = Serve(directory, next_hop_port)
    with open(server.log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(server.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            cwd=directory,
        )
    try:
        wait_for_port("127.0.0.1", server.port, process=process)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_local_deferral_is_warning(tmp_path: Path) -> None:
    # A Maildir whose tmp folder is a file cannot take a message: a fault of
    # this host that an operator watching warnings must see.
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    (tmp_path / "mail" / "bob" / "tmp").write_text("not a folder\n")
    (tmp_path / "aliases").write_text("")

    with serve(tmp_path, free_port()) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("alice@example.test", ["bob@example.test"], b"Subject: local\r\n\r\nbody\r\n")
        deferred = server.wait_for("deferred", to="bob@example.test")

    assert deferred["level"] == "warning"
    assert deferred["relay"] == "local"
    assert deferred["reply"].startswith("451 4.3.0 local delivery failed: ")
