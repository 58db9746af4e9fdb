"""RCPT for a local user when ``maildir_root`` cannot be read: a temporary reply, never ``550 5.1.1``.

The tests may run as root, which passes every permission check, so most
cases break ``maildir_root`` in ways that fail for root too: a regular
file (ENOTDIR) and a symlink loop (ELOOP).  The case of a caller without
search permission (EACCES) runs ``relay sendmail`` as nobody through
setpriv when the tests run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from server_helpers import RelayProcess
from test_sendmail import sendmail, stored_messages
from test_sendmail_smtp import EHLO, reply_codes, run_bs

from conftest import REPO_ROOT
from relay.config import load_config
from relay.smtp import replies
from relay.smtp.policy import RelayPolicy
from relay.spool import RecipientState

BROKEN_ROOTS = {
    "file": "Not a directory",
    "symlink_loop": "Too many levels of symbolic links",
}


def break_maildir_root(path: Path, kind: str) -> None:
    """Make ``path`` a maildir_root that no user, root included, can look a folder up in."""
    if kind == "file":
        path.write_text("not a folder\n")
    else:
        loop = path.with_name(path.name + "-loop")
        path.symlink_to(loop)
        loop.symlink_to(path)


@pytest.mark.parametrize("kind", sorted(BROKEN_ROOTS))
def test_rcpt_defers_when_maildir_root_broken(tmp_path: Path, kind: str) -> None:
    with RelayProcess(tmp_path) as relay:
        # Broken once relay runs, because relay serve rejects a maildir_root that is a file at start.
        break_maildir_root(tmp_path / "mail", kind)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("client.example")
            client.mail("sender@client.example")
            alice = client.rcpt("alice@example.net")
            bob = client.rcpt("bob@example.net")
            # Configured users and postmaster need no lookup, so they are still accepted.
            configured = client.rcpt("rcpt@example.net")
            postmaster = client.rcpt("postmaster@example.net")

    assert alice == (451, b"4.3.0 Local error in processing, try again later")
    assert bob == alice
    assert configured[0] == 250
    assert postmaster[0] == 250
    log = relay.log()
    # One warning with the cause for the operator, the path kept out of the reply.
    warnings = [line for line in log.splitlines() if "recipient_lookup_error" in line]
    assert len(warnings) == 1, log
    assert f"maildir_root {tmp_path / 'mail'} for user alice" in warnings[0]
    assert BROKEN_ROOTS[kind] in warnings[0]
    assert "failures=1" in warnings[0]
    assert log.count('reply="451 4.3.0 Local error in processing, try again later"') == 2
    assert "550 5.1.1" not in log


def test_rcpt_alias_with_address_accepted_when_root_broken(tmp_path: Path) -> None:
    break_maildir_root(tmp_path / "mail", "file")
    (tmp_path / "aliases").write_text("team: bob, ops@remote.example\nsolo: bob\n")
    (tmp_path / "relay.toml").write_text(
        '[policy]\nlocal_domains = ["example.net"]\n'
        f'[local]\nmaildir_root = "{tmp_path / "mail"}"\naliases = "{tmp_path / "aliases"}"\n'
    )
    policy = RelayPolicy(load_config(tmp_path / "relay.toml"))

    # The remote address decides for team, whatever bob's folder holds.
    assert policy.check_recipient("team", "example.net", privileged=False) is None
    assert policy.check_recipient("solo", "example.net", privileged=False) is replies.LOCAL_ERROR
    assert policy.check_recipient("bob", "example.net", privileged=False) is replies.LOCAL_ERROR


def write_sendmail_config(directory: Path, maildir_root: Path) -> Path:
    config = directory / "relay.toml"
    config.write_text(
        f'[spool]\npath = "{directory / "spool"}"\n'
        '[policy]\nlocal_domains = ["example.test"]\n'
        f'[local]\nmaildir_root = "{maildir_root}"\n'
    )
    return config


@pytest.mark.parametrize("kind", sorted(BROKEN_ROOTS))
def test_sendmail_queues_when_maildir_root_broken(tmp_path: Path, kind: str) -> None:
    break_maildir_root(tmp_path / "mail", kind)
    config = write_sendmail_config(tmp_path, tmp_path / "mail")

    result = sendmail(["--config", str(config), "alice", "bob@example.test"], b"Subject: x\n\nhi\n")

    assert result.returncode == 0, result.stderr
    # Nothing is rejected, so nothing is reported, and delivery decides later.
    assert result.stderr == b""
    [(stored, _)] = stored_messages(tmp_path / "spool")
    assert [r.address for r in stored.recipients] == ["alice@example.test", "bob@example.test"]
    for recipient in stored.recipients:
        assert recipient.state is RecipientState.QUEUED
        assert recipient.last_reply is None


def test_sendmail_bs_accepts_when_maildir_root_broken(tmp_path: Path) -> None:
    break_maildir_root(tmp_path / "mail", "file")
    config = write_sendmail_config(tmp_path, tmp_path / "mail")
    dialogue = EHLO + b"MAIL FROM:<app@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    dialogue += b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"

    result = run_bs(config, dialogue)

    assert result.returncode == 0, result.stderr
    assert reply_codes(result.stdout) == ["220", "250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    assert b"recipient_lookup_error" not in result.stderr
    [(stored, _)] = stored_messages(tmp_path / "spool")
    [recipient] = stored.recipients
    assert recipient.address == "alice@example.test"
    assert recipient.state is RecipientState.QUEUED


def test_sendmail_queues_when_caller_cannot_search_root() -> None:
    # The usual setup: maildir_root belongs to the relay's user, mode 0700,
    # and a program of another user runs sendmail.
    command = [sys.executable, "-m", "relay", "sendmail"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to run sendmail without root's rights")
        command = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]
    # Not under tmp_path, whose parent folder is private to the user running the tests.
    directory = Path(tempfile.mkdtemp(prefix="relay-rcpt-"))
    try:
        directory.chmod(0o755)
        (directory / "mail" / "alice").mkdir(parents=True)
        (directory / "spool").mkdir()
        config = write_sendmail_config(directory, directory / "mail")
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(directory / "spool", nobody.pw_uid, nobody.pw_gid)
        (directory / "mail").chmod(0)

        result = subprocess.run(
            [*command, "--config", str(config), "alice"],
            input=b"Subject: x\n\nhi\n", capture_output=True, timeout=60, cwd=directory,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )

        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        [(stored, _)] = stored_messages(directory / "spool")
        [recipient] = stored.recipients
        assert recipient.address == "alice@example.test"
        assert recipient.state is RecipientState.QUEUED
    finally:
        (directory / "mail").chmod(0o700)
        shutil.rmtree(directory)
