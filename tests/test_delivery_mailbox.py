"""``relay mailbox``: summary lines with decoded headers, and printing one message."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.cli import main
from relay.config import load_config
from relay.delivery.maildir import LocalDelivery

MESSAGE = b"From: =?utf-8?q?J=C3=B6rg?= <j@x.test>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nhi\r\n"


def test_mailbox_lists_and_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "relay.toml").write_text('[local]\nmaildir_root = "mail"\nusers = ["alice"]\n')
    config = load_config(tmp_path / "relay.toml")
    path = LocalDelivery.from_config(config.local).deliver("alice", "j@x.test", "alice@localhost", MESSAGE)
    assert path.parent.name == "new"

    assert main(["mailbox", "alice", "--config", str(tmp_path / "relay.toml")]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[0] == "1"
    assert "Jörg" in line
    assert "Grüße" in line

    assert main(["mailbox", "alice", "1", "--config", str(tmp_path / "relay.toml")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Return-Path: <j@x.test>\r\nDelivered-To: alice@localhost\r\n")

    assert main(["mailbox", "alice", "2", "--config", str(tmp_path / "relay.toml")]) == 1
    error = capsys.readouterr().err
    assert "message 2 not found;" in error
    assert error.rstrip().endswith("contains 1 message")
