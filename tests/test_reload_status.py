"""Reload status across processes: the reload_summary line, /healthz and the reload metric of `relay serve`."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import load_config
from relay.reload_status import ProcessReload, ReloadStatus, config_fingerprint
from tests.server_helpers import wait_until
from tests.test_operations import Relay, rcpt_code, scrape

RELOAD_METRIC = "relay_config_last_reload_successful"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    # Two workers and the delivery process: three processes re-read the file.
    server = Relay(tmp_path, workers=2)
    server.start()
    # A SIGHUP that reaches a process while it installs its handlers may be handled twice.
    server.wait_for_log(" started worker=", count=3)
    try:
        yield server
    finally:
        server.stop()


def healthz(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def reload_metric(port: int) -> float:
    return scrape(port)[RELOAD_METRIC][()]


def summary_lines(relay: Relay) -> list[str]:
    return [line for line in relay.log().splitlines() if " reload_summary " in line]


def hang_up(relay: Relay, summaries: int) -> str:
    """Send SIGHUP to the supervisor and return the reload_summary line logged for it."""
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    relay.wait_for_log(" reload_summary ", count=summaries)
    return summary_lines(relay)[summaries - 1]


def worker_pid(relay: Relay, index: int) -> int:
    pattern = re.compile(rf" started worker={index} pid=(\d+)")
    # The listeners accept before the started line reaches the log.
    assert wait_until(lambda: pattern.search(relay.log()) is not None), relay.log()
    match = pattern.search(relay.log())
    assert match is not None
    return int(match.group(1))


def test_applied_reload_summarized_once(relay: Relay) -> None:
    relay.write(domains='"example.test", "new.test"')
    summary = hang_up(relay, 1)

    assert " info " in summary, summary
    assert 'applied=worker-0,worker-1,delivery rejected="" configs=1' in summary, summary
    # Each process's own line is at debug level, so the summary is the one line at info.
    # A process writes its log lines shortly after its report, so they may follow the summary.
    relay.wait_for_log(" reloaded ", count=3)
    reloaded = [line for line in relay.log().splitlines() if " reloaded " in line]
    assert len(reloaded) == 3, relay.log()
    assert all(" debug " in line for line in reloaded), reloaded
    assert healthz(relay.admin_port) == "ok\n"
    assert reload_metric(relay.admin_port) == 1.0
    assert rcpt_code(relay.port, "alice@new.test") == 250


def test_rejected_reload_names_every_process(relay: Relay) -> None:
    relay.write(domains='"example.test"', broken=True)
    summary = hang_up(relay, 1)

    assert " warning " in summary, summary
    assert 'applied="" rejected=worker-0,worker-1,delivery configs=1' in summary, summary
    body = healthz(relay.admin_port)
    assert body.startswith("ok\n"), body
    assert "rejected by worker-0, worker-1, delivery;" in body, body
    assert "different configs" not in body, body
    assert reload_metric(relay.admin_port) == 0.0

    # A good file again: every process applies it, and the status clears.
    relay.write(domains='"example.test"')
    summary = hang_up(relay, 2)
    assert 'rejected="" configs=1' in summary, summary
    assert healthz(relay.admin_port) == "ok\n"
    assert reload_metric(relay.admin_port) == 1.0


def test_sighup_to_one_worker_shows_split(relay: Relay) -> None:
    # A SIGHUP sent to one worker instead of the supervisor leaves that worker
    # on the new file and the other processes on the old one.
    relay.write(domains='"example.test", "new.test"')
    os.kill(worker_pid(relay, 1), signal.SIGHUP)
    relay.wait_for_log(" reloaded ", count=1)

    expected = "the processes run 2 different configs (worker-0, delivery; worker-1)"
    assert wait_until(lambda: expected in healthz(relay.admin_port)), healthz(relay.admin_port)
    assert reload_metric(relay.admin_port) == 0.0
    # Only a SIGHUP sent to the supervisor gets a summary.
    assert summary_lines(relay) == []

    summary = hang_up(relay, 1)
    assert " info " in summary, summary
    assert "configs=1" in summary, summary
    assert healthz(relay.admin_port) == "ok\n"
    assert reload_metric(relay.admin_port) == 1.0


def test_one_worker_healthz_after_rejected_reload(tmp_path: Path) -> None:
    # With one worker there is no supervisor: its own outcome is reported, and no summary is logged.
    relay = Relay(tmp_path, workers=1)
    relay.start()
    relay.wait_for_log(" started worker=")
    try:
        relay.write(domains='"example.test"', broken=True)
        assert relay.process is not None
        relay.process.send_signal(signal.SIGHUP)
        relay.wait_for_log(" reload_failed ")
        body = healthz(relay.admin_port)
        assert body.startswith("ok\nthe last config reload was rejected;"), body
        assert reload_metric(relay.admin_port) == 0.0
    finally:
        relay.stop()
    assert summary_lines(relay) == []


def test_healthz_lines_name_groups_and_rejections() -> None:
    status = ReloadStatus(
        (
            ProcessReload("worker-0", True, 7),
            ProcessReload("worker-1", False, 5),
            ProcessReload("delivery", True, 7),
        )
    )
    lines = status.healthz_lines()

    assert not status.successful
    assert len(lines) == 2, lines
    assert lines[0].startswith("the processes run 2 different configs (worker-0, delivery; worker-1);"), lines
    assert lines[1].startswith("the last config reload was rejected by worker-1;"), lines
    assert ReloadStatus.from_json(status.to_json()) == status


def test_healthz_lines_empty_before_any_reload() -> None:
    status = ReloadStatus((ProcessReload("worker-0", None, 3), ProcessReload("delivery", None, 3)))

    assert status.successful
    assert status.healthz_lines() == []


def test_status_file_garbage_rejected() -> None:
    with pytest.raises(ValueError, match="invalid reload status"):
        ReloadStatus.from_json(b'{"worker-0": true}')


def test_fingerprint_same_for_equal_configs(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[policy]\nlocal_domains = ["a.test", "b.test"]\ntrusted_networks = ["127.0.0.0/8", "::1/128"]\n')
    first = load_config(str(path))

    assert config_fingerprint(first) == config_fingerprint(load_config(str(path)))
    path.write_text('[policy]\nlocal_domains = ["a.test"]\ntrusted_networks = ["127.0.0.0/8", "::1/128"]\n')
    assert config_fingerprint(first) != config_fingerprint(load_config(str(path)))

