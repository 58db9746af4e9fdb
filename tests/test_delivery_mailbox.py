"""``relay mailbox``: summary lines with decoded headers, and printing one message.

Messages are real files in a Maildir under ``tmp_path``.  The closed-pipe
tests run ``python -m relay`` as a child process, because only a real pipe
shows what the command does when its reader exits.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, require_peer
from relay.cli import main
from relay.config import LocalConfig, load_config
from relay.delivery import mailbox_cli, maildir
from relay.delivery.maildir import LocalDelivery, UnknownUser

MESSAGE = b"From: =?utf-8?q?J=C3=B6rg?= <j@x.test>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nhi\r\n"

# Character offsets of the columns: "NNNN  YYYY-MM-DD HH:MM  sender(40)  subject(60)  size".
SENDER_START = 4 + 2 + 16 + 2
SUBJECT_START = SENDER_START + 40 + 2
SIZE_START = SUBJECT_START + 60 + 2


def write_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(f'[local]\nmaildir_root = "mail"\nusers = ["alice", "bob"]\n{extra}')
    return config


def write_message(tmp_path: Path, name: str, data: bytes, *, folder: str = "new", mtime: float = 1_700_000_000) -> Path:
    """Write one message file into alice's Maildir, with a fixed delivery time for ordering."""
    root = tmp_path / "mail" / "alice"
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    path = root / folder / name
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def mailbox(config: Path, *args: str) -> int:
    return main(["mailbox", *args, "--config", str(config)])


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
    # Maildir files have LF line ends, as Postfix's local(8) writes them.
    assert printed.startswith("Return-Path: <j@x.test>\nDelivered-To: alice@localhost\nFrom: ")
    assert "\r" not in printed
    assert path.read_bytes().endswith(b"\n\nhi\n")

    assert main(["mailbox", "alice", "2", "--config", str(tmp_path / "relay.toml")]) == 1
    error = capsys.readouterr().err
    assert "message 2 not found;" in error
    assert error.rstrip().endswith("contains 1 message")


# -- closed stdout -------------------------------------------------------------


@pytest.mark.parametrize("number", [None, "1"], ids=["list", "print"])
def test_mailbox_closed_pipe_is_quiet(tmp_path: Path, number: str | None) -> None:
    config = write_config(tmp_path)
    if number is None:
        # About 130 bytes a line, so 1000 lines overflow Linux's default 64 KiB pipe
        # capacity and the command is still writing when the reader exits.
        for index in range(1000):
            write_message(tmp_path, f"{index:05d}.x", f"Subject: s {index}\r\n\r\nhi\r\n".encode(), mtime=index)
    else:
        write_message(tmp_path, "big.x", b"Subject: big\r\n\r\n" + b"a" * 70 * 30_000 + b"\r\n")
    command = [sys.executable, "-m", "relay", "mailbox", "alice"]
    if number is not None:
        command.append(number)
    command += ["--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout is not None and process.stderr is not None

    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    status = process.wait(timeout=60)

    assert first
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr
    assert status == 1


def test_mailbox_list_reads_headers_only(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    header = b"From: big@x.test\nSubject: larger than memory\n\n"
    path = write_message(tmp_path, "big.x", header + b"body\n")
    # A sparse file: 2 GiB long, but only a few blocks on disk.
    size = 2 * 1024**3
    os.truncate(path, size)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    write_message(tmp_path, "small.x", b"Subject: small\n\nhi\n", mtime=1_700_000_060)

    # The child may map 1 GiB, so reading the whole message would raise MemoryError.
    limit = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (1024**3, 1024**3));"
    run_relay = "sys.argv[0] = 'relay'; runpy.run_module('relay', run_name='__main__')"
    command = [sys.executable, "-c", limit + run_relay, "mailbox", "alice", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    assert result.stderr == ""
    assert result.returncode == 0
    first, second = result.stdout.splitlines()
    assert first[SUBJECT_START:SIZE_START].rstrip() == "larger than memory"
    assert first[SIZE_START:] == str(size)
    assert second[SUBJECT_START:SIZE_START].rstrip() == "small"


def test_mailbox_header_section_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    # The subject is beyond the part of the header section the list reads.
    padding = b"X-Padding: " + b"p" * 900 + b"\n"
    count = mailbox_cli.HEADER_READ_LIMIT // len(padding) + 1
    data = b"From: a@x.test\n" + padding * count + b"Subject: too far\n\nhi\n"
    write_message(tmp_path, "1.x", data)

    assert mailbox(config, "alice") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line[SENDER_START:SUBJECT_START].rstrip() == "a@x.test"
    assert line[SUBJECT_START:SIZE_START].rstrip() == ""
    assert line[SIZE_START:] == str(len(data))


# -- unreadable Maildir --------------------------------------------------------


@pytest.mark.parametrize("folder", ["new", "cur"])
def test_mailbox_permission_denied_names_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    # Root may read a folder whatever its mode, so the test raises the error where iterdir() would.
    config = write_config(tmp_path)
    write_message(tmp_path, "1.x", MESSAGE)
    denied = tmp_path / "mail" / "alice" / folder
    original_iterdir = Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if self == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)

    assert mailbox(config, "alice") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"permission denied on {denied}" in captured.err
    assert "relay's user" in captured.err
    assert "readable" in captured.err
    assert len(captured.err.splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_mailbox_unreadable_folder_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    write_message(tmp_path, "1.x", MESSAGE)
    denied = tmp_path / "mail" / "alice" / "new"
    denied.chmod(0)
    try:
        assert mailbox(config, "alice") == 1
    finally:
        denied.chmod(0o700)
    assert f"permission denied on {denied}" in capsys.readouterr().err


# -- messages that move or vanish while listed ---------------------------------


def test_mailbox_follows_moved_skips_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path)
    moved = write_message(tmp_path, "1.moved", b"Subject: moved\r\n\r\nx\r\n", mtime=1)
    deleted = write_message(tmp_path, "2.deleted", b"Subject: deleted\r\n\r\nx\r\n", mtime=2)
    write_message(tmp_path, "3.kept", b"Subject: kept\r\n\r\nx\r\n", mtime=3)
    original = mailbox_cli._message_files

    def listing_then_changes(root: Path) -> list[tuple[Path, float]]:
        # A mail client marks one message seen and deletes another right after the listing.
        files = original(root)
        moved.rename(root / "cur" / "1.moved:2,S")
        deleted.unlink()
        return files

    monkeypatch.setattr(mailbox_cli, "_message_files", listing_then_changes)

    assert mailbox(config, "alice") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2"]
    assert "moved" in lines[0]
    assert "kept" in lines[1]


def test_mailbox_skips_file_gone_before_stat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path)
    write_message(tmp_path, "1.x", b"Subject: present\r\n\r\nx\r\n")
    new = tmp_path / "mail" / "alice" / "new"
    original_iterdir = Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        entries = list(original_iterdir(self))
        # A name the folder listed but whose file was renamed before stat().
        return iter([*entries, new / "2.gone"]) if self == new else iter(entries)

    monkeypatch.setattr(Path, "iterdir", iterdir)

    assert mailbox(config, "alice") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "present" in lines[0]


def test_mailbox_message_in_new_and_cur_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What a listing reads when a message moves from new/ to cur/ between reading the two folders.
    config = write_config(tmp_path)
    write_message(tmp_path, "1.same", b"Subject: once\r\n\r\nx\r\n")
    write_message(tmp_path, "1.same:2,S", b"Subject: once\r\n\r\nx\r\n", folder="cur")

    assert mailbox(config, "alice") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "once" in lines[0]


def test_mailbox_ignores_symbolic_links(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A link in a Maildir must not make the operator's command print the file it points to.
    config = write_config(tmp_path)
    write_message(tmp_path, "1.real", b"Subject: real\r\n\r\nx\r\n")
    secret = tmp_path / "secret"
    secret.write_bytes(b"Subject: secret\r\n\r\nroot:x:0:0\r\n")
    (tmp_path / "mail" / "alice" / "new" / "2.link").symlink_to(secret)

    assert mailbox(config, "alice") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "real" in lines[0]
    assert mailbox(config, "alice", "2") == 1
    assert "secret" not in capsys.readouterr().out


def test_mailbox_ignores_linked_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    write_message(tmp_path, "1.real", b"Subject: real\r\n\r\nx\r\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "2.secret").write_bytes(b"Subject: secret\r\n\r\nroot:x:0:0\r\n")
    (tmp_path / "mail" / "alice" / "cur").rmdir()
    (tmp_path / "mail" / "alice" / "cur").symlink_to(elsewhere)

    assert mailbox(config, "alice") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "real" in lines[0]


def test_mailbox_print_deleted_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path)
    path = write_message(tmp_path, "1.x", MESSAGE)
    original = mailbox_cli._message_files

    def listing_then_delete(root: Path) -> list[tuple[Path, float]]:
        files = original(root)
        path.unlink()
        return files

    monkeypatch.setattr(mailbox_cli, "_message_files", listing_then_delete)

    assert mailbox(config, "alice", "1") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "message 1 (1.x) was deleted" in captured.err
    assert "Traceback" not in captured.err


# -- header decoding and terminal safety ---------------------------------------


def test_mailbox_raw_utf8_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    data = "From: Jörg <jörg@client.test>\r\nSubject: Grüße roh ✓\r\n\r\nhi\r\n".encode()
    write_message(tmp_path, "1.x", data)

    assert mailbox(config, "alice") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "\ufffd" not in line
    assert line[SENDER_START:SUBJECT_START].rstrip() == "Jörg <jörg@client.test>"
    assert line[SUBJECT_START:SIZE_START].rstrip() == "Grüße roh ✓"
    assert line[SIZE_START:] == str(len(data))


def test_mailbox_invalid_utf8_and_encoded_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    # Latin-1 "ä" (0xE4) is not valid UTF-8, and the encoded word sits next to raw UTF-8 text.
    data = b"From: M\xe4rz <m@x.test>\r\nSubject: r\xc3\xb6h =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nhi\r\n"
    write_message(tmp_path, "1.x", data)

    assert mailbox(config, "alice") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line[SENDER_START:SUBJECT_START].rstrip() == "M\ufffdrz <m@x.test>"
    assert line[SUBJECT_START:SIZE_START].rstrip() == "röh Grüße"
    assert line[SIZE_START:] == str(len(data))


def test_mailbox_wide_characters_keep_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    data = "From: a@x.test\r\nSubject: 中文\r\n\r\nhi\r\n".encode()
    write_message(tmp_path, "1.x", data)

    assert mailbox(config, "alice") == 0
    (line,) = capsys.readouterr().out.splitlines()
    # Each of the two characters takes two terminal cells, so the padding is 60 - 4 spaces.
    assert line[SUBJECT_START:].startswith("中文" + " " * 56 + "  ")
    assert line.endswith("  " + str(len(data)))


def test_mailbox_folded_subject_unfolded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    data = b"From: a@x.test\r\nSubject: first part\r\n\tsecond\r\n part\r\n\r\nhi\r\n"
    write_message(tmp_path, "1.x", data)

    assert mailbox(config, "alice") == 0
    output = capsys.readouterr().out
    (line,) = output.splitlines()
    assert "\r" not in output
    assert line[SUBJECT_START:SIZE_START].rstrip() == "first part second part"
    assert line[SIZE_START:] == str(len(data))


def test_mailbox_escapes_control_characters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    # ESC from an encoded word, a raw UTF-8 C1 CSI (U+009B), DEL, and an encoded CR LF.
    data = b"From: x\x7fy@x.test\r\nSubject: =?utf-8?q?=1B[2J=1B[31mred?= \xc2\x9b1m =?utf-8?q?a=0D=0Ab?=\r\n\r\nhi\r\n"
    path = write_message(tmp_path, "1.x", data)

    assert mailbox(config, "alice") == 0
    output = capsys.readouterr().out
    (line,) = output.splitlines()
    assert line[SENDER_START:SUBJECT_START].rstrip() == "x\\x7fy@x.test"
    assert line[SUBJECT_START:SIZE_START].rstrip() == "\\x1b[2J\\x1b[31mred \\x9b1m a\\x0d\\x0ab"
    for character in output.rstrip("\n"):
        code = ord(character)
        assert not (code < 0x20 or 0x7F <= code <= 0x9F), f"control character U+{code:04X} in {line!r}"

    assert mailbox(config, "alice", "1") == 0
    assert capsys.readouterr().out.encode("utf-8", "surrogateescape") == path.read_bytes()


@pytest.mark.parametrize(
    "date",
    [
        "Mon, 1 Jan 99999 10:00:00 +0000",
        "Mon, 1 Jan 100000000000000000000 10:00:00 +0000",
        "Mon, 99999999999999999999 Jan 2024 10:00:00 +0000",
        "Mon, 1 Jan 2024 10:00:00 +99999999999999999999",
        "Tue, 99 Foo 2024",
    ],
)
def test_mailbox_invalid_date_uses_delivery_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], date: str
) -> None:
    config = write_config(tmp_path)
    write_message(tmp_path, "1.x", f"From: a@x.test\r\nDate: {date}\r\nSubject: bad date\r\n\r\nhi\r\n".encode())
    write_message(tmp_path, "2.x", b"From: b@x.test\r\nSubject: next\r\n\r\nhi\r\n", mtime=1_700_000_060)

    assert mailbox(config, "alice") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    first, second = captured.out.splitlines()
    delivery_time = time.strftime("%Y-%m-%d %H:%M", time.localtime(1_700_000_000))
    assert first[6:SENDER_START].rstrip() == delivery_time
    assert first[SUBJECT_START:SIZE_START].rstrip() == "bad date"
    assert second[SUBJECT_START:SIZE_START].rstrip() == "next"


def test_mailbox_escapes_bidi_controls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    data = "From: x@x.test\r\nSubject: invoice\u202efdp.exe\r\n\r\nhi\r\n".encode()
    write_message(tmp_path, "1.x", data)

    assert mailbox(config, "alice") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line[SUBJECT_START:SIZE_START].rstrip() == "invoice\\u202efdp.exe"


def test_mailbox_print_is_byte_exact(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    config = write_config(tmp_path)
    data = b"Subject: \x1b[31m\r\n\r\n\xff\xfe raw \x00 bytes\r\n"
    write_message(tmp_path, "1.x", data)

    assert mailbox(config, "alice", "1") == 0
    assert capsysbinary.readouterr().out == data


# -- known but empty, unknown, alias -------------------------------------------


@pytest.mark.parametrize("user", ["bob", "postmaster", "Bob"])
def test_mailbox_known_user_without_maildir(tmp_path: Path, capsys: pytest.CaptureFixture[str], user: str) -> None:
    config = write_config(tmp_path)

    assert mailbox(config, user) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"relay mailbox: mailbox {user.lower()} is empty")


def test_mailbox_existing_empty_maildir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "mail" / "carol" / sub).mkdir(parents=True)

    assert mailbox(config, "carol") == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "relay mailbox: mailbox carol is empty\n"


def test_mailbox_unknown_user_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)

    assert mailbox(config, "mallory") == 1
    error = capsys.readouterr().err
    assert f"mailbox {tmp_path / 'mail' / 'mallory'} not found;" in error
    assert "is empty" not in error


def test_mailbox_alias_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "aliases").write_text("postmaster: alice\nsales: alice, boss@elsewhere.test\n")
    config = write_config(tmp_path, 'aliases = "aliases"\n')

    for alias, targets in [("sales", "alice, boss@elsewhere.test"), ("postmaster", "alice")]:
        assert mailbox(config, alias) == 1
        error = capsys.readouterr().err
        assert "not found" in error
        assert f"{alias} is an alias for {targets}" in error


def test_mailbox_alias_naming_itself_is_empty_before_delivery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "aliases").write_text("carol: carol, copy@elsewhere.test\n")
    config = write_config(tmp_path, 'aliases = "aliases"\n')

    assert mailbox(config, "carol") == 0
    assert capsys.readouterr().err.startswith("relay mailbox: mailbox carol is empty")


def test_mailbox_reports_invalid_aliases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "aliases").write_text("sales: alice\nloop: pool\npool: loop\n")
    config = write_config(tmp_path, 'aliases = "aliases"\n')

    assert mailbox(config, "carol") == 1

    error = capsys.readouterr().err
    assert f"invalid [local] aliases {tmp_path / 'aliases'}: line 2: aliases form a loop, loop -> pool -> loop" in error
    assert error.rstrip().endswith("run relay check-config to see each error")


def test_mailbox_print_without_maildir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)

    assert mailbox(config, "bob", "1") == 1
    assert "message 1 not found;" in capsys.readouterr().err


# -- user names that would leave maildir_root ----------------------------------


@pytest.mark.parametrize("user", ["../etc", "a/b", "..", "a..b", ".hidden", "a\0b", ""])
def test_mailbox_rejects_unsafe_user_name(tmp_path: Path, capsys: pytest.CaptureFixture[str], user: str) -> None:
    config = write_config(tmp_path)
    # A Maildir outside maildir_root that "../etc" would reach.
    for sub in ("new", "cur"):
        (tmp_path / "etc" / sub).mkdir(parents=True)
    (tmp_path / "etc" / "new" / "1.x").write_bytes(MESSAGE)

    assert mailbox(config, user) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"relay mailbox: invalid user name {user!r}:")


@pytest.mark.parametrize("user", ["../outside", "..", ".hidden", "a/b"])
def test_local_delivery_stays_in_root(tmp_path: Path, user: str) -> None:
    # A transport entry "local" hands any local part of its domain to local delivery.
    (tmp_path / "mail").mkdir()
    for folder in ("outside", ".hidden", "mail/.hidden", "mail/a/b"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    local = LocalDelivery(LocalConfig(maildir_root=str(tmp_path / "mail"), users=(user,)))

    assert not local.user_exists(user)
    with pytest.raises(UnknownUser):
        local.expand(user)
    with pytest.raises(ValueError, match="invalid local user name"):
        local.deliver(user, "sender@example.test", f"{user}@example.test", b"Subject: x\r\n\r\nbody\r\n")
    assert not (tmp_path / "outside" / "new").exists()


def test_maildir_keeps_binarymime_crlf(tmp_path: Path) -> None:
    config = LocalConfig(maildir_root=str(tmp_path / "mail"), users=("alice",))
    body = b"Content-Type: application/octet-stream\r\n\r\n\x00\r\n\xff\n\r\n"

    path = LocalDelivery.from_config(config).deliver("alice", "j@x.test", "alice@localhost", body, binary=True)

    assert path.read_bytes() == b"Return-Path: <j@x.test>\r\nDelivered-To: alice@localhost\r\n" + body


def test_maildir_name_clash_keeps_existing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file in new/ with the name that delivery picks first, as another
    # process with the same process ID could have written.
    config = LocalConfig(maildir_root=str(tmp_path / "mail"), users=("alice",))
    names = iter(["1700000000.M1P1Q0.host", "1700000000.M1P1Q1.host"])
    monkeypatch.setattr(maildir, "_unique_name", lambda: next(names))
    for folder in ("tmp", "new", "cur"):
        (tmp_path / "mail" / "alice" / folder).mkdir(parents=True)
    existing = tmp_path / "mail" / "alice" / "new" / "1700000000.M1P1Q0.host"
    existing.write_bytes(b"Subject: first\n\nkept\n")

    path = LocalDelivery.from_config(config).deliver("alice", "j@x.test", "alice@localhost", MESSAGE)

    assert existing.read_bytes() == b"Subject: first\n\nkept\n"
    assert path == existing.with_name("1700000000.M1P1Q1.host")
    assert path.read_bytes().startswith(b"Return-Path: <j@x.test>\nDelivered-To: alice@localhost\n")
    assert list((tmp_path / "mail" / "alice" / "tmp").iterdir()) == []


def test_mailbox_rejects_too_long_user_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Longer than any file name (NAME_MAX), so a lookup would fail with ENAMETOOLONG.
    config = write_config(tmp_path)
    user = "a" * 256

    assert mailbox(config, user) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"relay mailbox: invalid user name {user!r}:")


# Delivers one message to a user whose Maildir does not exist yet.
_DELIVER_NEW_USER = """
import sys
from relay.config import LocalConfig
from relay.delivery.maildir import LocalDelivery
local = LocalDelivery(LocalConfig(maildir_root=sys.argv[1], users=("dave",)))
local.deliver("dave", "sender@example.test", "dave@localhost", b"Subject: x\\r\\n\\r\\nbody\\r\\n")
"""


def test_maildir_creation_is_durable(tmp_path: Path) -> None:
    # A delivered message must survive power loss, so the parent of each folder
    # that delivery creates must be fsynced before the message reaches new/.
    # strace records the system calls of a real delivery.
    strace = require_peer("strace")
    root = tmp_path / "mail"
    trace = tmp_path / "trace"
    subprocess.run(
        [strace, "-f", "-qq", "-o", str(trace), "-e", "trace=mkdir,mkdirat,openat,fsync,close,link,linkat",
         sys.executable, "-c", _DELIVER_NEW_USER, str(root)],
        check=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=60,
    )

    created: list[str] = []
    fsynced: set[str] = set()
    open_paths: dict[str, str] = {}
    for line in trace.read_text().splitlines():
        call = re.search(r'(\w+)\((?:AT_FDCWD, )?"?([^",)]*)"?.*\)\s+=\s+(-?\d+)', line)
        if call is None:
            continue
        name, argument, result = call.groups()
        if name.startswith("mkdir") and result == "0":
            created.append(os.path.normpath(argument))
        elif name == "openat" and result != "-1":
            open_paths[result] = os.path.normpath(argument)
        elif name == "fsync" and argument in open_paths:
            fsynced.add(open_paths[argument])
        elif name.startswith("link"):
            break  # the message is in new/ from here on

    assert created == [str(root), str(root / "dave"), *(str(root / "dave" / f) for f in ("tmp", "new", "cur"))]
    for folder in created:
        assert os.path.dirname(folder) in fsynced, f"{os.path.dirname(folder)} not fsynced after mkdir {folder}"


# Delivers one small message, then one larger than RLIMIT_FSIZE allows: the
# write fails with EFBIG (Python ignores SIGXFSZ), as it would on a full disk.
_DELIVER_OVER_FILE_LIMIT = """
import errno, resource, sys
from relay.config import LocalConfig
from relay.delivery.maildir import LocalDelivery
local = LocalDelivery(LocalConfig(maildir_root=sys.argv[1], users=("alice",)))
local.deliver("alice", "sender@example.test", "alice@localhost", b"Subject: small\\r\\n\\r\\nbody\\r\\n")
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
try:
    local.deliver("alice", "sender@example.test", "alice@localhost", b"Subject: big\\r\\n\\r\\n" + b"x" * 65536)
except OSError as exc:
    print(exc)
    sys.exit(0 if exc.errno == errno.EFBIG else 3)
sys.exit(2)
"""


def test_maildir_failed_write_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    result = subprocess.run(
        [sys.executable, "-c", _DELIVER_OVER_FILE_LIMIT, str(root)],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=60, capture_output=True, text=True,
    )

    assert result.returncode == 0, result.stderr
    # The error, which becomes the 4.3.0 deferral reply, names the file in tmp/.
    assert result.stdout.startswith(f"[Errno {errno.EFBIG}] File too large: '{root / 'alice' / 'tmp'}/")
    assert list((root / "alice" / "tmp").iterdir()) == []
    delivered = list((root / "alice" / "new").iterdir())
    assert len(delivered) == 1
    assert b"Subject: small" in delivered[0].read_bytes()


def test_mailbox_maildir_root_not_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Looking up alice under a maildir_root that is a file fails with ENOTDIR, also for root.
    config = write_config(tmp_path)
    (tmp_path / "mail").write_text("not a folder\n")

    assert mailbox(config, "carol") == 1

    error = capsys.readouterr().err
    assert f"cannot read maildir_root {tmp_path / 'mail'} for user carol: Not a directory" in error
    assert "Traceback" not in error
