"""Tests of ``relay queue``: listing, filters, JSON, show, flush, hold, release, delete."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from spool_helpers import make_body, make_envelope, run

from relay.cli import main
from relay.spool import DeliveryResult, Envelope, Outcome, Recipient, Spool, SpoolStore, new_queue_id
from relay.spool.store import database_path


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
        "flushed 1 recipient(s)\n"
    )
    assert _queue(capsys, "flush", queue_id, "--spool", str(spool_dir))[1] == "flushed 2 recipient(s)\n"
    assert _queue(capsys, "hold", queue_id, "--spool", str(spool_dir))[1] == f"{queue_id}: held 2 recipient(s)\n"
    status, out, _ = _queue(capsys, "list", "--json", "--state", "held", "--spool", str(spool_dir))
    assert status == 0
    assert len(_json_lines(out)) == 1
    assert _queue(capsys, "release", queue_id, "--spool", str(spool_dir))[1] == (
        f"{queue_id}: released 2 recipient(s)\n"
    )
    with SpoolStore(spool_dir) as store:
        message = store.load(queue_id)
    assert message is not None
    assert [r.state.value for r in message.recipients] == ["deferred", "deferred"]
    assert all(r.next_attempt <= time.time() for r in message.recipients)


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
    assert "2 undelivered recipient(s)" in prompts[0]

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
    assert err == f"relay queue: queue ID {missing} not found in the spool\n"


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
    assert "moved aside to" in err
    assert (spool_dir / "corrupt" / f"{broken}.json").exists()
