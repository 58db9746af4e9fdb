"""Tests of ``relay queue``: listing, filters, JSON, show, flush, hold, release, delete, and spool errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from spool_helpers import make_body, make_envelope, run
from test_delivery_local_once import attempted
from test_delivery_local_once import commit as commit_to
from test_delivery_local_once import make_config as make_alias_config
from test_delivery_local_once import run_until as run_scheduler_until
from test_sendmail import sendmail, write_config

from conftest import REPO_ROOT
from relay.cli import build_parser, main
from relay.spool import DeliveryResult, Envelope, Outcome, Recipient, Spool, SpoolStore, new_queue_id
from relay.spool.cli import format_iso_time
from relay.spool.store import FLUSH_REQUEST, database_path

# User and group ID of "nobody", which a child running as root switches to.
NOBODY = 65534


@pytest.fixture
def spool_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "spool"
    Spool.open(directory).close()
    yield directory


def _commit(directory: Path, envelope: Envelope, body: bytes = b"Subject: hello\r\nX-Test: 1\r\n\r\nbody\r\n") -> str:
    spool = Spool.open(directory)
    try:
        return spool.commit_blocking(envelope, body)
    finally:
        spool.close()


def _defer(directory: Path, queue_id: str, index: int, reply: str, delay: float = 3600) -> None:
    spool = Spool.open(directory)
    try:
        result = DeliveryResult(queue_id, index, Outcome.DEFERRED, reply, "mx.two.example.test", time.time() + delay)
        run(spool.record_results([result]))
    finally:
        spool.close()


@pytest.fixture
def shared_spool_dir() -> Iterator[Path]:
    """Yield a spool whose parent directory every user can search, so a child running as nobody reaches it."""
    base = Path(tempfile.mkdtemp(prefix="relay-queue-cli-"))
    directory = base / "spool"
    try:
        base.chmod(0o755)
        Spool.open(directory).close()
        yield directory
    finally:
        # A test may have taken the owner's permissions away, and rmtree needs them back.
        if directory.exists():
            directory.chmod(0o700)
        shutil.rmtree(base)


def _queue_without_owner_rights(*args: str) -> tuple[int, str, str]:
    """Run ``relay queue`` in a forked child that only has the rights the spool's permission bits grant.

    Root passes every permission check, so as root the child switches to
    nobody.  Any other user stays itself, and the test's chmod then limits the
    owner too.  Returns the exit status, stdout and stderr (a traceback on an
    uncaught exception, with status -1).
    """
    # Import every subcommand module now, because as nobody the child may not read the standard library's directory.
    build_parser()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        result: list[Any] = [-1, "", ""]
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = main(["queue", *args])
            result = [status, out.getvalue(), err.getvalue()]
        except BaseException:
            result[2] = traceback.format_exc()
        finally:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(orjson.dumps(result))
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    status, out, err = orjson.loads(data)
    return status, out, err


def _queue(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["queue", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _json_lines(output: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.splitlines()]


def test_list_empty_queue(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _queue(capsys, "list", "--spool", str(spool_dir))
    assert status == 0
    assert out.strip() == "Mail queue is empty"


def test_spool_with_invalid_config_rejected(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --spool picks the directory, but a --config given as well must still be valid.
    missing = spool_dir / "missing.toml"
    with pytest.raises(SystemExit) as raised:
        main(["queue", "list", "--config", str(missing), "--spool", str(spool_dir)])
    assert raised.value.code == 1
    assert f"{missing}: file not found" in capsys.readouterr().err


def test_foreign_database_left_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An empty file or another program's database is reported, not turned into a spool.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "spool.db").touch()
    other = tmp_path / "other"
    other.mkdir()
    with sqlite3.connect(other / "spool.db") as connection:
        connection.execute("CREATE TABLE foo (x)")
    connection.close()

    for directory, problem in ((empty, "is an empty database"), (other, "is not a relay spool")):
        status, out, err = _queue(capsys, "list", "--spool", str(directory))
        assert status == 1
        assert out == ""
        assert err == f"relay queue: {directory / 'spool.db'} {problem}" + (
            " (it has no message table)" if directory is other else ""
        ) + "; check --spool or [spool] path\n"
    assert (empty / "spool.db").stat().st_size == 0
    with sqlite3.connect(other / "spool.db") as connection:
        assert [name for (name,) in connection.execute("SELECT name FROM sqlite_master")] == ["foo"]
    connection.close()


def test_list_names_host_once(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    _defer(spool_dir, queue_id, 0, "451 4.4.1 connect to mx.two.example.test[192.0.2.2]:25 failed: refused")

    out = _queue(capsys, "list", "--spool", str(spool_dir))[1]

    assert "(451 4.4.1 connect to mx.two.example.test[192.0.2.2]:25 failed: refused)" in out
    assert out.count("mx.two.example.test") == 1


def test_list_no_match_says_so(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _commit(spool_dir, make_envelope())
    status, out, _ = _queue(capsys, "list", "--state", "held", "--spool", str(spool_dir))
    assert status == 0
    assert out == "No message in the queue matches the filters\n"


def test_list_shows_messages_like_mailq(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=2))
    _defer(spool_dir, queue_id, 1, "451 4.7.1 greylisted")
    status, out, _ = _queue(capsys, "list", "--spool", str(spool_dir))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert lines[1].startswith(queue_id)
    assert lines[1].endswith("sender@example.test")
    assert "user0@one.example.test  queued" in out
    assert "user1@two.example.test  deferred (attempt 1" in out
    assert "(451 4.7.1 greylisted from mx.two.example.test)" in out
    assert lines[-1] == "-- 1 Kbytes in 1 message."


def test_list_json_document(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    envelope = Envelope(
        "",
        (Recipient("postmaster@one.example.test", orcpt="rfc822;pm@one.example.test", notify=("NEVER",)),),
        body_type="8BITMIME",
        client_address="127.0.0.2",
        helo_name="client.test",
    )
    queue_id = _commit(spool_dir, envelope, b"x" * 10)
    status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_dir))
    assert status == 0
    [document] = _json_lines(out)
    assert document["queue_id"] == queue_id
    assert document["sender"] == ""
    assert document["size"] == 10
    assert document["client_address"] == "127.0.0.2"
    assert document["esmtp"] == {"size": None, "body": "8BITMIME", "smtputf8": False, "ret": None, "envid": None}
    [recipient] = document["recipients"]
    assert recipient["address"] == "postmaster@one.example.test"
    assert recipient["orcpt"] == "rfc822;pm@one.example.test"
    assert recipient["notify"] == ["NEVER"]
    assert recipient["state"] == "queued"
    assert recipient["last_host"] is None


def test_list_json_empty_queue_prints_nothing(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_dir))
    assert status == 0
    assert out == ""


def test_list_json_local_failure_host_null(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=1))
    spool = Spool.open(spool_dir)
    try:
        result = DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451 4.3.0 no route", "", time.time() + 3600)
        run(spool.record_results([result]))
    finally:
        spool.close()
    status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_dir))
    assert status == 0
    [document] = _json_lines(out)
    [recipient] = document["recipients"]
    assert recipient["last_reply"] == "451 4.3.0 no route"
    assert recipient["last_host"] is None


def test_list_closed_pipe_exits_1(spool_dir: Path) -> None:
    for _ in range(3):
        _commit(spool_dir, make_envelope(recipients=50))
    list_command = [sys.executable, "-m", "relay", "queue", "list", "--spool", str(spool_dir)]
    # A reader that closes at once, as `head -1` does after its first line.
    with subprocess.Popen(list_command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        error = process.stderr.read()
        status = process.wait(timeout=60)
    assert status == 1
    assert error == b""


def test_list_filters(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from_alice = _commit(spool_dir, Envelope("alice@example.test", (Recipient("a@one.example.test"),)))
    from_null = _commit(spool_dir, Envelope("", (Recipient("b@two.example.test"),)))
    _defer(spool_dir, from_null, 0, "451 later")

    def listed(*filters: str) -> list[str]:
        status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_dir), *filters)
        assert status == 0
        return [document["queue_id"] for document in _json_lines(out)]

    assert listed() == [from_alice, from_null]
    assert listed("--sender", "ALICE@example.test") == [from_alice]
    assert listed("--sender", "<alice@example.test>") == [from_alice]
    assert listed("--sender", "<>") == [from_null]
    assert listed("--domain", "two.example.test") == [from_null]
    assert listed("--state", "deferred") == [from_null]
    assert listed("--state", "held") == []


def test_list_domain_matches_by_idna2008(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # IDNA2008, as delivery uses: straße.test is xn--strae-oqa.test, and strasse.test
    # (which IDNA2003 maps "ß" to) is another domain.  One message of each
    # form is deferred, so the filter reads both recipient rows and fresh rows.
    u_label = _commit(spool_dir, Envelope("", (Recipient("a@straße.test"),), smtputf8=True))
    a_label = _commit(spool_dir, Envelope("", (Recipient("b@xn--strae-oqa.test"),)))
    other = _commit(spool_dir, Envelope("", (Recipient("c@strasse.test"),)))
    both = (Recipient("d@STRASSE.test"), Recipient("e@straße.test"))
    deferred = _commit(spool_dir, Envelope("", both, smtputf8=True))
    _defer(spool_dir, deferred, 0, "451 later")

    def listed(domain: str) -> list[str]:
        status, out, _ = _queue(capsys, "list", "--json", "--domain", domain, "--spool", str(spool_dir))
        assert status == 0
        return [document["queue_id"] for document in _json_lines(out)]

    assert listed("straße.test") == [u_label, a_label, deferred]
    assert listed("STRAẞE.test") == [u_label, a_label, deferred]
    assert listed("xn--strae-oqa.test") == [u_label, a_label, deferred]
    assert listed("strasse.test") == [other, deferred]


def test_show_envelope_history_headers(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=2, auth_user="alice", envid="ENV1"))
    _defer(spool_dir, queue_id, 1, "451 4.7.1 greylisted")
    status, out, _ = _queue(capsys, "show", queue_id, "--spool", str(spool_dir))
    assert status == 0
    assert f"Queue ID:      {queue_id}" in out
    assert "Authenticated: alice" in out
    assert "ENVID:         ENV1" in out
    assert "[1] user1@two.example.test  deferred, 1 attempt(s)" in out
    assert "deferred host=mx.two.example.test reply=451 4.7.1 greylisted" in out
    # Arrival, the next attempt and the history lines all print UTC ISO 8601 with milliseconds.
    iso_time = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.search(rf"^Arrival: +{iso_time}$", out, re.MULTILINE)
    assert re.search(rf"^ +next attempt {iso_time}$", out, re.MULTILINE)
    assert re.search(rf"^ +{iso_time} deferred host=", out, re.MULTILINE)
    assert out.endswith("Headers:\nSubject: hello\nX-Test: 1\n")


def test_show_body_prints_message(spool_dir: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    body = make_body("show-body", 3000)
    queue_id = _commit(spool_dir, make_envelope(), body)
    assert main(["queue", "show", queue_id, "--body", "--spool", str(spool_dir)]) == 0
    out = capfdbinary.readouterr().out
    assert out.endswith(body)


def test_hold_release_flush(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=2))
    _defer(spool_dir, queue_id, 0, "451 later")
    _defer(spool_dir, queue_id, 1, "451 later")

    assert _queue(capsys, "flush", "--domain", "two.example.test", "--spool", str(spool_dir))[1] == (
        "flushed 1 recipient\n"
    )
    # The recipient at two.example.test is due already, so only the other one counts.
    assert _queue(capsys, "flush", queue_id, "--spool", str(spool_dir))[1] == "flushed 1 recipient\n"
    assert _queue(capsys, "hold", queue_id, "--spool", str(spool_dir))[1] == f"{queue_id}: held 2 recipients\n"
    status, out, _ = _queue(capsys, "list", "--json", "--state", "held", "--spool", str(spool_dir))
    assert status == 0
    assert len(_json_lines(out)) == 1
    assert _queue(capsys, "release", queue_id, "--spool", str(spool_dir))[1] == (
        f"{queue_id}: released 2 recipients\n"
    )
    with SpoolStore(spool_dir) as store:
        message = store.load(queue_id)
    assert message is not None
    assert [r.state.value for r in message.recipients] == ["deferred", "deferred"]
    assert all(r.next_attempt <= time.time() for r in message.recipients)


def test_hold_release_twice_explained(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    assert _queue(capsys, "release", queue_id, "--spool", str(spool_dir))[1] == (
        f"{queue_id}: released 0 recipients, none is held\n"
    )
    assert _queue(capsys, "hold", queue_id, "--spool", str(spool_dir))[1] == f"{queue_id}: held 2 recipients\n"
    assert _queue(capsys, "hold", queue_id, "--spool", str(spool_dir)) == (
        0, f"{queue_id}: held 0 recipients, none is queued or deferred\n", ""
    )


def test_delete_with_yes(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    status, out, _ = _queue(capsys, "delete", queue_id, "--yes", "--spool", str(spool_dir))
    assert status == 0
    assert out == f"{queue_id}: deleted\n"
    with SpoolStore(spool_dir) as store:
        assert store.queue_ids() == []


def test_delete_asks_on_terminal(
    spool_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    answers = iter(["n", "y"])
    prompts: list[str] = []
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    def answer(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("builtins.input", answer)

    status, out, _ = _queue(capsys, "delete", queue_id, "--spool", str(spool_dir))
    assert status == 1
    assert out == "not deleted\n"
    assert queue_id in prompts[0]
    assert "2 undelivered recipients" in prompts[0]

    status, out, _ = _queue(capsys, "delete", queue_id, "--spool", str(spool_dir))
    assert status == 0
    with SpoolStore(spool_dir) as store:
        assert store.queue_ids() == []


@pytest.mark.parametrize("action", ["show", "hold", "release", "delete", "flush"])
def test_unknown_id_exits_1(spool_dir: Path, capsys: pytest.CaptureFixture[str], action: str) -> None:
    missing = new_queue_id()
    extra = ["--yes"] if action == "delete" else []
    status, out, err = _queue(capsys, action, missing, *extra, "--spool", str(spool_dir))
    assert status == 1
    assert out == ""
    assert err == (
        f"relay queue: queue ID {missing} not found in the spool {spool_dir};"
        " `relay queue list` with the same --spool or --config shows the queue IDs\n"
    )


def test_invalid_id_exits_1(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _queue(capsys, "show", "nonsense", "--spool", str(spool_dir))
    assert status == 1
    assert "invalid queue ID 'nonsense'" in err


def test_missing_spool_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _queue(capsys, "list", "--spool", str(tmp_path / "absent"))
    assert status == 1
    assert "no spool in" in err
    assert not (tmp_path / "absent").exists()


def test_spool_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(tmp_path / "configured", make_envelope())
    config = tmp_path / "relay.toml"
    config.write_text('[spool]\npath = "configured"\n')
    status, out, _ = _queue(capsys, "list", "--json", "--config", str(config))
    assert status == 0
    assert [document["queue_id"] for document in _json_lines(out)] == [queue_id]


def test_corrupt_record_reported(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _commit(spool_dir, make_envelope())
    sound = _commit(spool_dir, make_envelope())
    with sqlite3.connect(database_path(spool_dir)) as connection:
        connection.execute("UPDATE message SET envelope = x'00' WHERE queue_id = ?", (broken,))
    status, out, err = _queue(capsys, "list", "--json", "--spool", str(spool_dir))
    assert status == 0
    assert [document["queue_id"] for document in _json_lines(out)] == [sound]
    assert f"message {broken} is corrupt" in err
    assert "left in the spool" in err
    assert not (spool_dir / "corrupt").exists()
    # Still in the spool, for relay serve or relay queue delete to remove.
    with SpoolStore(spool_dir) as store:
        assert broken in store.queue_ids()


@pytest.mark.parametrize(
    ("action", "unchanged"), [("hold", "not held"), ("release", "not released"), ("flush", "not flushed")]
)
@pytest.mark.parametrize("damage", ["envelope", "recipients"])
def test_change_to_corrupt_record_rejected(
    spool_dir: Path, capsys: pytest.CaptureFixture[str], action: str, unchanged: str, damage: str
) -> None:
    broken = _commit(spool_dir, make_envelope())
    if damage == "recipients":
        # Recipient rows exist once an attempt was recorded, so deleting them is the damage.
        _defer(spool_dir, broken, 0, "451 4.3.0 later")
    with sqlite3.connect(database_path(spool_dir)) as connection:
        if damage == "envelope":
            connection.execute("UPDATE message SET envelope = CAST('{not json' AS BLOB) WHERE queue_id = ?", (broken,))
        else:
            connection.execute("DELETE FROM recipient WHERE queue_id = ?", (broken,))
    connection.close()

    status, out, err = _queue(capsys, action, broken, "--spool", str(spool_dir))

    assert status == 1
    assert out == ""
    assert f"relay queue: message {broken} is corrupt: " in err
    assert f"; {unchanged} and left in the spool" in err
    when = "next starts" if damage == "recipients" else "next tries to deliver it"
    assert f"moves it aside to corrupt/ when it {when}," in err
    assert f"`relay queue delete {broken}` removes it" in err
    assert "Traceback" not in err
    assert not (spool_dir / FLUSH_REQUEST).exists()
    with sqlite3.connect(database_path(spool_dir)) as connection:
        history = connection.execute("SELECT outcome FROM attempt WHERE queue_id = ?", (broken,)).fetchall()
    connection.close()
    assert history == ([] if damage == "envelope" else [("deferred",)])


def test_flush_empty_domain_rejected(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    _defer(spool_dir, queue_id, 0, "451 4.3.0 later")

    status, out, err = _queue(capsys, "flush", "--domain", "", "--spool", str(spool_dir))

    assert status == 1
    assert "--domain '' is empty" in err
    assert out == ""


@pytest.mark.parametrize("action", ["list", "flush"])
def test_domain_with_space_rejected(spool_dir: Path, capsys: pytest.CaptureFixture[str], action: str) -> None:
    _commit(spool_dir, make_envelope())

    domain = "one.example.test two.example.test"
    status, out, err = _queue(capsys, action, "--domain", domain, "--spool", str(spool_dir))

    assert status == 1
    assert "--domain 'one.example.test two.example.test' contains a space" in err
    assert out == ""


@pytest.mark.parametrize(("domain", "problem"), [("", "is empty"), (" ", "is empty"), ("@@", "contains @"),
                                                 ("bob@example.test", "contains @")])
def test_domain_empty_or_address_rejected(
    spool_dir: Path, capsys: pytest.CaptureFixture[str], domain: str, problem: str
) -> None:
    status, out, err = _queue(capsys, "list", "--domain", domain, "--spool", str(spool_dir))

    assert status == 1
    assert f"--domain {domain!r} {problem}" in err
    assert out == ""


def test_text_file_spool_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "spool.db").write_text("not a database, just text\n" * 200)

    status, out, err = _queue(capsys, "list", "--spool", str(directory))

    assert status == 1
    assert out == ""
    assert f"{directory / 'spool.db'} is not an SQLite database; check --spool or [spool] path" in err


def test_directory_as_spool_db_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spool" / "spool.db").mkdir(parents=True)

    status, out, err = _queue(capsys, "list", "--spool", str(tmp_path / "spool"))

    assert status == 1
    assert out == ""
    assert f"{tmp_path / 'spool' / 'spool.db'} is a directory, not a database; check --spool" in err


def test_domain_surrounding_blanks_ignored(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope())

    status, out, _ = _queue(capsys, "list", "--json", "--domain", " two.example.test ", "--spool", str(spool_dir))

    assert status == 0
    assert [document["queue_id"] for document in _json_lines(out)] == [queue_id]


def test_config_from_environment(tmp_path: Path) -> None:
    queue_id = _commit(tmp_path / "configured", make_envelope())
    config = tmp_path / "relay.toml"
    config.write_text('[spool]\npath = "configured"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RELAY_CONFIG": str(config)}

    result = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "list"], capture_output=True, text=True, env=env, cwd=elsewhere,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert queue_id in result.stdout


def test_corrupt_record_deleted_with_yes(spool_dir: Path) -> None:
    broken = _commit(spool_dir, make_envelope())
    with sqlite3.connect(database_path(spool_dir)) as connection:
        connection.execute("UPDATE message SET envelope = x'00' WHERE queue_id = ?", (broken,))
    command = [sys.executable, "-m", "relay", "queue", "delete", broken, "--yes", "--spool", str(spool_dir)]

    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{broken}: deleted\n"
    # The log line carries its fields, not only the event name.
    (line,) = [line for line in result.stderr.splitlines() if "removed" in line]
    assert f"queue_id={broken}" in line
    with SpoolStore(spool_dir) as store:
        assert store.queue_ids() == []


def test_delete_corrupt_without_terminal_needs_yes(spool_dir: Path) -> None:
    broken = _commit(spool_dir, make_envelope())
    with sqlite3.connect(database_path(spool_dir)) as connection:
        connection.execute("UPDATE message SET envelope = x'00' WHERE queue_id = ?", (broken,))
    command = [sys.executable, "-m", "relay", "queue", "delete", broken, "--spool", str(spool_dir)]

    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr == (
        f"relay queue: cannot ask whether to delete {broken}: standard input is not a terminal;"
        " pass --yes to delete without confirmation\n"
    )
    with SpoolStore(spool_dir) as store:
        assert store.queue_ids() == [broken]


def test_delete_unknown_id_without_terminal(
    spool_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not found comes before the question, so a script learns the ID is wrong.
    missing = _commit(spool_dir, make_envelope())
    with SpoolStore(spool_dir) as store, store.transaction():
        store.delete(missing)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)

    status, out, err = _queue(capsys, "delete", missing, "--spool", str(spool_dir))

    assert status == 1
    assert out == ""
    assert err == (
        f"relay queue: queue ID {missing} not found in the spool {spool_dir};"
        " `relay queue list` with the same --spool or --config shows the queue IDs\n"
    )


def test_delete_without_terminal_needs_yes(
    spool_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")

    status, out, err = _queue(capsys, "delete", queue_id, "--spool", str(spool_dir))

    assert status == 1
    assert out == ""
    assert err == (
        f"relay queue: cannot ask whether to delete {queue_id}: standard input is not a terminal;"
        " pass --yes to delete without confirmation\n"
    )
    with SpoolStore(spool_dir) as store:
        assert store.queue_ids() == [queue_id]


@pytest.mark.parametrize("interruption", [EOFError, KeyboardInterrupt])
def test_delete_prompt_interrupted_is_no(
    spool_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    interruption: type[BaseException],
) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)

    def interrupt(prompt: str) -> str:
        raise interruption

    monkeypatch.setattr("builtins.input", interrupt)

    status, out, err = _queue(capsys, "delete", queue_id, "--spool", str(spool_dir))

    assert status == 1
    assert out == "\nnot deleted\n"
    assert err == ""
    with SpoolStore(spool_dir) as store:
        assert store.queue_ids() == [queue_id]


@pytest.mark.parametrize(
    "action", [["list"], ["show", "ID"], ["flush"], ["hold", "ID"], ["release", "ID"], ["delete", "ID", "--yes"]]
)
def test_unreadable_spool_exits_1(shared_spool_dir: Path, action: list[str]) -> None:
    queue_id = _commit(shared_spool_dir, make_envelope())
    arguments = [queue_id if argument == "ID" else argument for argument in action]
    shared_spool_dir.chmod(0o000)

    status, out, err = _queue_without_owner_rights(*arguments, "--spool", str(shared_spool_dir))

    assert "Traceback" not in err
    assert status == 1
    assert out == ""
    assert err.startswith(f"relay queue: cannot read spool {shared_spool_dir}: Permission denied (owner ")
    assert err.endswith(", mode 0000); run as the user that owns it\n")


def test_read_only_spool_listed(shared_spool_dir: Path) -> None:
    queue_id = _commit(shared_spool_dir, make_envelope())
    database_path(shared_spool_dir).chmod(0o444)
    shared_spool_dir.chmod(0o555)

    status, out, err = _queue_without_owner_rights("list", "--spool", str(shared_spool_dir))

    assert err == ""
    assert status == 0
    assert queue_id in out
    shared_spool_dir.chmod(0o700)
    with SpoolStore(shared_spool_dir) as store:
        assert store.queue_ids() == [queue_id]


def test_flush_empty_id_exits_1(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=1))
    _defer(spool_dir, queue_id, 0, "451 later")

    status, out, err = _queue(capsys, "flush", "", "--spool", str(spool_dir))

    assert status == 1
    assert out == ""
    assert err.startswith("relay queue: invalid queue ID ''; expected 15 characters")
    with SpoolStore(spool_dir) as store:
        message = store.load(queue_id)
    assert message is not None
    assert message.recipients[0].next_attempt > time.time()


@pytest.mark.parametrize("action", ["flush", "release"])
def test_flush_and_release_write_flush_request(
    spool_dir: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=1))
    _defer(spool_dir, queue_id, 0, "451 later")
    if action == "release":
        assert _queue(capsys, "hold", queue_id, "--spool", str(spool_dir))[0] == 0
    # The scheduler notices a new request by the file's inode, mtime and size.
    request = spool_dir / FLUSH_REQUEST
    request.write_text("0.0\n")
    os.utime(request, (0, 0))
    started = time.time()

    status, _, _ = _queue(capsys, action, queue_id, "--spool", str(spool_dir))

    assert status == 0
    assert float(request.read_text()) >= started
    assert request.stat().st_mtime >= started - 1


@pytest.mark.parametrize("action", ["show", "hold", "release", "flush", "delete"])
def test_lower_case_id_accepted(spool_dir: Path, capsys: pytest.CaptureFixture[str], action: str) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    extra = ["--yes"] if action == "delete" else []

    status, out, err = _queue(capsys, action, queue_id.lower(), *extra, "--spool", str(spool_dir))

    assert err == ""
    assert status == 0
    if action != "flush":
        assert queue_id in out


@pytest.mark.parametrize("argument", ["1k1vbbhega3n28", "1k1vbbhega3n28u", "1k1vbbhega3n28\u00df"])
def test_malformed_lower_case_id_rejected(
    spool_dir: Path, capsys: pytest.CaptureFixture[str], argument: str
) -> None:
    status, out, err = _queue(capsys, "show", argument, "--spool", str(spool_dir))
    assert status == 1
    assert out == ""
    assert err.startswith(f"relay queue: invalid queue ID {argument!r}; expected 15 characters of Crockford base32")


def test_spool_option_regular_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    regular = tmp_path / "afile"
    regular.write_text("")

    status, out, err = _queue(capsys, "list", "--spool", str(regular))

    assert status == 1
    assert out == ""
    assert err == (
        f"relay queue: spool {regular} is not a directory; give the spool directory in --spool or [spool] path\n"
    )


def test_spool_option_empty_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The config names a valid spool, which an empty --spool must not fall back to.
    _commit(tmp_path / "configured", make_envelope())
    config = tmp_path / "relay.toml"
    config.write_text('[spool]\npath = "configured"\n')

    status, out, err = _queue(capsys, "list", "--spool", "", "--config", str(config))

    assert status == 1
    assert out == ""
    assert err.startswith("relay queue: --spool is empty;")


def test_locked_spool_names_wait_and_next_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "spool"
    queue_id = _commit(directory, make_envelope())
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{directory}"\nbusy_timeout = "200ms"\n')
    holder = sqlite3.connect(database_path(directory), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        status, out, err = _queue(capsys, "hold", queue_id, "--config", str(config))
        holder.execute("ROLLBACK")
    finally:
        holder.close()

    assert status == 1
    assert out == ""
    assert err.startswith(f"relay queue: spool {directory}: begin transaction failed: database is locked;")
    assert "for the 200ms this command waited ([spool] busy_timeout)" in err
    assert err.endswith("; retry, or look for a stopped relay process that holds it\n")
    with SpoolStore(directory) as store:
        assert store.queue_ids(state=None) == [queue_id]
        message = store.load(queue_id)
    assert message is not None
    assert [r.state.value for r in message.recipients] == ["queued", "queued"]


def test_show_escapes_header_controls(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = (
        b"Subject: hello\r\n"
        b"X-Bin: \x01\x02\x1b[31mred\x7f\r\n"
        b"X-C1: \xc2\x9b2J and\ttab\r\n"
        b"X-Folded: one\r\n\ttwo\r\n"
        b"X-Bare-CR: a\rb\r\n"
        b"X-Bidi: invoice\xe2\x80\xaefdp.exe\r\n"
        b"\r\n\x1b[31mbody\r\n"
    )
    queue_id = _commit(spool_dir, make_envelope(), body)

    status, out, _ = _queue(capsys, "show", queue_id, "--spool", str(spool_dir))

    assert status == 0
    assert out.endswith(
        "Headers:\n"
        "Subject: hello\n"
        "X-Bin: \\x01\\x02\\x1b[31mred\\x7f\n"
        "X-C1: \\x9b2J and\ttab\n"
        "X-Folded: one\n\ttwo\n"
        "X-Bare-CR: a\\x0db\n"
        "X-Bidi: invoice\\u202efdp.exe\n"
    )
    assert "\x1b" not in out
    assert "\x9b" not in out


def test_remote_replies_escaped(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    _defer(spool_dir, queue_id, 0, "451 4.3.0 busy \x1b[2J\x1b[31mnow")

    show_status, shown, _ = _queue(capsys, "show", queue_id, "--spool", str(spool_dir))
    list_status, listed, _ = _queue(capsys, "list", "--spool", str(spool_dir))

    assert show_status == 0
    assert list_status == 0
    assert "busy \\x1b[2J\\x1b[31mnow" in shown
    assert "busy \\x1b[2J\\x1b[31mnow" in listed
    assert "\x1b" not in shown
    assert "\x1b" not in listed


def test_next_hop_name_escaped(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    spool = Spool.open(spool_dir)
    try:
        result = DeliveryResult(
            queue_id, 0, Outcome.DEFERRED, "451 4.3.0 busy", "mx\x1b[2J.example.test", time.time() + 3600
        )
        run(spool.record_results([result]))
    finally:
        spool.close()

    show_status, shown, _ = _queue(capsys, "show", queue_id, "--spool", str(spool_dir))
    list_status, listed, _ = _queue(capsys, "list", "--spool", str(spool_dir))

    assert show_status == 0
    assert list_status == 0
    assert "host=mx\\x1b[2J.example.test" in shown
    assert "from mx\\x1b[2J.example.test)" in listed
    assert "\x1b" not in shown
    assert "\x1b" not in listed


def test_show_body_keeps_controls(spool_dir: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    body = b"X-Bin: \x01\x1b[31mred\r\n\r\nbody\r\n"
    queue_id = _commit(spool_dir, make_envelope(), body)
    assert main(["queue", "show", queue_id, "--body", "--spool", str(spool_dir)]) == 0
    assert capfdbinary.readouterr().out.endswith(body)


def test_list_on_ascii_output(spool_dir: Path) -> None:
    envelope = Envelope("jörg@client.test", (Recipient("user@example.test"),), smtputf8=True)
    spool = Spool.open(spool_dir)
    try:
        spool.commit_blocking(envelope, b"Subject: x\r\n\r\nbody\r\n")
    finally:
        spool.close()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "ascii"}

    result = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "list", "--spool", str(spool_dir)],
        capture_output=True, text=True, env=env, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "j\\xf6rg@client.test" in result.stdout


def _commit_many(directory: Path, count: int) -> list[str]:
    """Commit ``count`` small messages in group commits and return their queue IDs."""

    async def commit_all(spool: Spool) -> list[str]:
        body = b"Subject: many\r\n\r\nbody\r\n"
        return list(await asyncio.gather(*(spool.commit(make_envelope(), body) for _ in range(count))))

    spool = Spool.open(directory)
    try:
        return run(commit_all(spool))
    finally:
        spool.close()


# Runs ``relay queue list --spool DIR`` and then writes the process's VmHWM line.
# VmHWM starts again at exec, unlike the ru_maxrss of wait4, which a child
# forked from pytest inherits.
_LIST_AND_PEAK = """
import sys
from relay.cli import main
status = main(["queue", "list", "--spool", sys.argv[1]])
sys.stdout.flush()
with open("/proc/self/status") as lines:
    sys.stderr.write(next(line for line in lines if line.startswith("VmHWM:")))
sys.exit(status)
"""


def _list_peak_memory(directory: Path) -> tuple[str, int]:
    """Run ``relay queue list`` in a child; return its first output line and its peak RSS in KiB."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _LIST_AND_PEAK, str(directory)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    peak = int(result.stderr.split()[1])
    return result.stdout.partition("\n")[0], peak


def test_list_memory_independent_of_queue(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    _commit_many(small, 10)
    _commit_many(large, 30_000)

    small_heading, small_peak = _list_peak_memory(small)
    large_heading, large_peak = _list_peak_memory(large)

    assert small_heading.startswith("-Queue ID-")
    assert large_heading.startswith("-Queue ID-")
    # Reading all 30,000 messages before printing took 35 MiB more (CPython 3.11, x86-64).
    assert large_peak - small_peak < 10 * 1024, (small_peak, large_peak)


def test_list_pages_cover_queue_once(spool_dir: Path) -> None:
    queue_ids = _commit_many(spool_dir, 7)
    with SpoolStore(spool_dir) as store:
        pages = list(store.queue_id_pages(page_size=3))
        at_domain = list(store.queue_id_pages(domain="two.example.test", page_size=3))
        exact = list(store.queue_id_pages(page_size=7))

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [queue_id for page in pages for queue_id in page] == sorted(queue_ids)
    assert [queue_id for page in at_domain for queue_id in page] == sorted(queue_ids)
    assert exact == [sorted(queue_ids)]


def test_list_corrupt_record_on_later_page(
    spool_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_ids = sorted(_commit_many(spool_dir, 5))
    broken = queue_ids[3]
    with sqlite3.connect(database_path(spool_dir)) as connection:
        connection.execute("UPDATE message SET envelope = x'00' WHERE queue_id = ?", (broken,))
    monkeypatch.setattr("relay.spool.store.LIST_PAGE", 2)

    status, out, err = _queue(capsys, "list", "--spool", str(spool_dir))

    assert status == 0
    listed = [line.split()[0] for line in out.splitlines() if line[:1].isdigit()]
    assert listed == [queue_id for queue_id in queue_ids if queue_id != broken]
    assert "-- 1 Kbytes in 4 messages." in out
    assert f"message {broken} is corrupt" in err
    assert not (spool_dir / "corrupt").exists()


def test_addresses_escaped_on_terminal(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The SMTP parser accepts all these characters in a UTF-8 forward-path.
    recipients = (
        Recipient("\u202eevil@x.test", orcpt="rfc822;\u202eevil@x.test"),
        Recipient("a\x85b@y.test"),
        Recipient("c\u2028d\u2029e@y.test"),
    )
    queue_id = _commit(spool_dir, Envelope("s\u202e@x.test", recipients, smtputf8=True))

    list_status, list_output, _ = _queue(capsys, "list", "--spool", str(spool_dir))
    show_status, show_output, _ = _queue(capsys, "show", queue_id, "--spool", str(spool_dir))

    assert list_status == 0
    assert show_status == 0
    for output in (list_output, show_output):
        assert "\\u202eevil@x.test" in output
        assert "a\\x85b@y.test" in output
        assert "s\\u202e@x.test" in output
        assert "\u202e" not in output
        assert "\x85" not in output
        assert "c\\u2028d\\u2029e@y.test" in output
        assert "\u2028" not in output
        assert "\u2029" not in output


def test_changes_logged_on_stderr(spool_dir: Path) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    stderr = {}
    for action in ("hold", "release", "flush", "delete"):
        extra = ["--yes"] if action == "delete" else []
        result = subprocess.run(
            [sys.executable, "-m", "relay", "queue", action, queue_id, *extra, "--spool", str(spool_dir)],
            capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        stderr[action] = result.stderr

    uid = f"uid={os.getuid()}"
    assert f"relay.queue: held queue_id={queue_id} recipients=2 {uid}" in stderr["hold"]
    assert f"relay.queue: released queue_id={queue_id} recipients=2 {uid}" in stderr["release"]
    assert f"relay.queue: flushed queue_id={queue_id} domain=- recipients=0 {uid}" in stderr["flush"]
    assert f'relay.spool: removed queue_id={queue_id} reason="deleted by operator" {uid}' in stderr["delete"]


def _record_bounces(directory: Path, queue_id: str) -> None:
    """Bounce recipient 1 as expired and recipient 2 with a 5xx, and put off recipient 1's DSN once."""
    spool = Spool.open(directory)
    try:
        results = [
            DeliveryResult(queue_id, 1, Outcome.FAILED, "451 4.4.1 no answer", "mx.two.example.test", expired=True),
            DeliveryResult(queue_id, 2, Outcome.FAILED, "550 5.1.1 no such user", "mx.one.example.test"),
        ]
        run(spool.record_results(results))
        assert run(spool.defer_dsn(queue_id, [1], time.time() + 600)) == 1
    finally:
        spool.close()


def test_list_json_ordinary_message_fields(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _commit(spool_dir, make_envelope(recipients=1))
    status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_dir))
    assert status == 0
    [document] = _json_lines(out)
    assert document["local_submission"] is False
    assert document["picked_up"] is False
    assert document["original_queue_id"] is None
    [recipient] = document["recipients"]
    assert recipient["delivered_targets"] == []
    assert recipient["expired"] is None
    assert recipient["dsn_attempts"] == 0
    assert recipient["dsn_due"] is None


def test_list_ordinary_message_stays_compact(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=2))
    _defer(spool_dir, queue_id, 1, "451 4.7.1 greylisted")
    status, out, _ = _queue(capsys, "list", "--spool", str(spool_dir))
    assert status == 0
    # Heading, the sender line, two recipients, one reply, a blank line and the total.
    assert len(out.splitlines()) == 7
    assert "DSN" not in out
    assert "expired" not in out
    assert "already delivered" not in out


def test_list_shows_expiry_and_dsn_put_off(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=3))
    _record_bounces(spool_dir, queue_id)
    status, out, _ = _queue(capsys, "list", "--spool", str(spool_dir))
    assert status == 0
    assert "user0@one.example.test  queued\n" in out
    assert re.search(
        r"user1@two\.example\.test  bounced \(expired\)"
        r" \(DSN not queued after 1 attempt, next try \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)$",
        out,
        re.MULTILINE,
    )
    assert re.search(r"user2@one\.example\.test  bounced$", out, re.MULTILINE)


def test_list_json_expiry_and_dsn_put_off(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=3))
    before = time.time()
    _record_bounces(spool_dir, queue_id)
    status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_dir))
    assert status == 0
    [document] = _json_lines(out)
    queued, expired, rejected = document["recipients"]
    assert queued["expired"] is None
    assert expired["expired"] is True
    assert rejected["expired"] is False
    assert expired["dsn"] == "pending"
    assert expired["dsn_attempts"] == 1
    assert expired["dsn_due"] > format_iso_time(before + 599)
    assert rejected["dsn"] == "pending"
    assert rejected["dsn_attempts"] == 0
    assert rejected["dsn_due"] is None


def test_show_expiry_and_dsn_put_off(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=3))
    _record_bounces(spool_dir, queue_id)
    status, out, _ = _queue(capsys, "show", queue_id, "--spool", str(spool_dir))
    assert status == 0
    assert "[1] user1@two.example.test  bounced (expired), 1 attempt(s)" in out
    assert "[2] user2@one.example.test  bounced, 1 attempt(s)" in out
    iso_time = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.search(rf"^ +DSN pending, not queued after 1 attempt, next try {iso_time}$", out, re.MULTILINE)
    # Recipient 2's DSN never failed to be queued.
    assert re.search(r"^ +DSN pending$", out, re.MULTILINE)
    assert "Submitted:" not in out
    assert "DSN for:" not in out


def test_dsn_names_original_message(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = _commit(spool_dir, make_envelope(recipients=1))
    dsn = Envelope("", (Recipient("sender@example.test"),), original_queue_id=original)
    dsn_id = _commit(spool_dir, dsn, b"Subject: Undelivered Mail\r\n\r\nreport\r\n")

    status, out, _ = _queue(capsys, "list", "--spool", str(spool_dir))
    assert status == 0
    assert re.search(rf"^{dsn_id} .* <>  \(DSN for {original}\)$", out, re.MULTILINE)
    assert re.search(rf"^{original} .* sender@example\.test$", out, re.MULTILINE)

    status, out, _ = _queue(capsys, "show", dsn_id, "--spool", str(spool_dir))
    assert status == 0
    assert f"\nDSN for:       {original}\n" in out

    status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_dir))
    assert status == 0
    documents = {document["queue_id"]: document for document in _json_lines(out)}
    assert documents[dsn_id]["original_queue_id"] == original
    assert documents[original]["original_queue_id"] is None


def test_alias_copy_names_submitted_message(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = _commit(spool_dir, make_envelope())
    copy_id = _commit(spool_dir, replace(make_envelope(), forwarded_from=original))

    status, out, _ = _queue(capsys, "show", copy_id, "--spool", str(spool_dir))
    assert status == 0
    assert f"\nAlias copy of: {original}\n" in out

    status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_dir))
    assert status == 0
    documents = {document["queue_id"]: document for document in _json_lines(out)}
    assert documents[copy_id]["forwarded_from"] == original
    assert documents[original]["forwarded_from"] is None


def test_show_json_document_and_history(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope(recipients=2, envid="ENV1"))
    _defer(spool_dir, queue_id, 1, "451 4.7.1 greylisted")
    status, out, _ = _queue(capsys, "show", queue_id, "--json", "--spool", str(spool_dir))
    assert status == 0
    [document] = _json_lines(out)
    status, listed, _ = _queue(capsys, "list", "--json", "--spool", str(spool_dir))
    assert status == 0
    [listed_document] = _json_lines(listed)
    history = document.pop("history")
    assert document == listed_document
    [attempt] = history
    assert attempt["index"] == 1
    assert attempt["outcome"] == "deferred"
    assert attempt["reply"] == "451 4.7.1 greylisted"
    assert attempt["host"] == "mx.two.example.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", attempt["time"])


def test_show_json_and_body_exclusive(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = _commit(spool_dir, make_envelope())
    with pytest.raises(SystemExit) as exit_info:
        main(["queue", "show", queue_id, "--json", "--body", "--spool", str(spool_dir)])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_sendmail_submission_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    spool_path = tmp_path / "spool"
    result = sendmail(["--config", str(config), "alice@example.test"], b"Subject: cron\n\nreport\n")
    assert result.returncode == 0, result.stderr

    status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_path))
    assert status == 0
    [document] = _json_lines(out)
    queue_id = document["queue_id"]
    assert document["local_submission"] is True
    assert document["picked_up"] is False
    assert document["client_address"] is None

    status, out, _ = _queue(capsys, "show", queue_id, "--spool", str(spool_path))
    assert status == 0
    assert "\nSubmitted:     by relay sendmail, not yet picked up by the scheduler\n" in out

    # A claim is how the scheduler picks up a message and logs picked_up.
    spool = Spool.open(spool_path)
    try:
        [claim] = run(spool.claim("queue-cli-test"))
        assert claim.picked_up
    finally:
        spool.close()

    status, out, _ = _queue(capsys, "list", "--json", "--spool", str(spool_path))
    assert status == 0
    [document] = _json_lines(out)
    assert document["picked_up"] is True
    status, out, _ = _queue(capsys, "show", queue_id, "--spool", str(spool_path))
    assert status == 0
    assert "\nSubmitted:     by relay sendmail, picked up by the scheduler\n" in out
    # list keeps ordinary text for a local submission.
    status, out, _ = _queue(capsys, "list", "--spool", str(spool_path))
    assert status == 0
    assert "sendmail" not in out


def test_alias_deferral_shows_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # carol's "new" folder is a file, so her write fails after alice and bob
    # got the message, and the scheduler defers team@ with the two stored.
    config = make_alias_config(tmp_path, "team: alice, bob, carol\n")
    (tmp_path / "mail" / "carol").mkdir()
    (tmp_path / "mail" / "carol" / "new").write_text("not a folder\n")
    spool = Spool.from_config(config.spool)
    try:
        queue_id = commit_to(spool, ["team@local.test"])
        assert run_scheduler_until(config, spool, lambda: attempted(config, queue_id))
    finally:
        spool.close()
    spool_path = str(config.spool.path)

    status, out, _ = _queue(capsys, "list", "--spool", spool_path)
    assert status == 0
    assert "team@local.test  deferred (attempt 1, next " in out
    # The deferral's reply names the targets, so list prints them once.
    assert out.count("already delivered to") == 1
    assert "; already delivered to alice, bob)" in out

    status, out, _ = _queue(capsys, "show", queue_id, "--spool", spool_path)
    assert status == 0
    assert "\n      already delivered to alias targets alice, bob\n" in out

    status, out, _ = _queue(capsys, "list", "--json", "--spool", spool_path)
    assert status == 0
    [document] = _json_lines(out)
    [recipient] = document["recipients"]
    assert recipient["state"] == "deferred"
    assert recipient["delivered_targets"] == ["alice", "bob"]
    assert recipient["expired"] is False


def test_list_targets_without_reply(spool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A stop of the scheduler during an alias delivery stores the targets
    # written so far without a result, so no reply names them.
    queue_id = _commit(spool_dir, Envelope("dora@local.test", (Recipient("team@local.test"),)))
    spool = Spool.open(spool_dir)
    try:
        [claim] = run(spool.claim("queue-cli-test"))
        assert run(spool.record_delivered_targets(queue_id, 0, ["alice", "bob"], claim.lease_token))
    finally:
        spool.close()

    status, out, _ = _queue(capsys, "list", "--spool", str(spool_dir))
    assert status == 0
    assert re.search(r"^ +team@local\.test  queued$", out, re.MULTILINE)
    assert re.search(r"^ +\(already delivered to alias targets alice, bob\)$", out, re.MULTILINE)
