"""The example configs in examples/ load without errors once their files exist, and the sink example runs."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port
from relay.config import ServerConfig, load_config
from relay.reload_status import config_fingerprint
from tests.server_helpers import wait_for_port

EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.toml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_config_loads(tmp_path: Path, example: Path) -> None:
    # Move the absolute paths under tmp_path and create the files they name.
    text = example.read_text().replace('"/etc/', f'"{tmp_path}/etc/').replace('"/var/', f'"{tmp_path}/var/')
    for name in ("etc/relay/tls/cert.pem", "etc/relay/tls/key.pem", "etc/relay/provider-password", "etc/relay/aliases"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    path = tmp_path / example.name
    path.write_text(text)

    config = load_config(path)

    assert config.listeners
    assert config.source == str(path)
    # Each kind of setting needs a stable form for the reload status to compare processes.
    assert config_fingerprint(config) == config_fingerprint(load_config(path))


def test_examples_cover_each_use() -> None:
    names = {path.name for path in EXAMPLES}

    assert names == {"relay-throughput.toml", "relay-sink.toml", "relay-smarthost.toml"}
    assert (REPO_ROOT / "examples" / "relay.service").is_file()


def test_sink_example_logs_totals(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "relay-sink.toml"
    example = (REPO_ROOT / "examples" / "relay-sink.toml").read_text()
    config.write_text(example.replace("127.0.0.1:2526", f"127.0.0.1:{port}"))
    log_path = tmp_path / "sink.log"
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=tmp_path,
        )
    try:
        wait_for_port("127.0.0.1", port, process=process)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("app@example.test", ["a@example.test", "b@example.test"], b"Subject: x\r\n\r\nhi\r\n")
        process.terminate()
        status = process.wait(30)
    finally:
        process.kill()
        process.wait()
    text = log_path.read_text()
    totals = re.findall(r"sink_totals .*messages=(\d+) recipients=(\d+)", text)

    assert status == 0, text
    # Each of the example's two workers logs one line; one of them took the message.
    assert len(totals) == 2, text
    assert sum(int(messages) for messages, _ in totals) == 1, text
    assert sum(int(recipients) for _, recipients in totals) == 2, text


def test_service_setup_creates_writable_paths() -> None:
    unit = (REPO_ROOT / "examples" / "relay.service").read_text()
    created: set[str] = set()
    writable: list[str] = []
    for line in unit.splitlines():
        command = line.removeprefix("#").strip()
        if command.startswith("install -d "):
            created.update(word for word in command.split() if word.startswith("/"))
        if line.startswith("ReadWritePaths="):
            writable += line.partition("=")[2].split()

    assert writable
    # systemd fails the start on a missing path unless it has a "-" prefix.
    for path in writable:
        assert path.startswith("-") or path in created, f"the setup steps do not create {path}"


def test_service_waits_for_readiness() -> None:
    unit = (REPO_ROOT / "examples" / "relay.service").read_text()
    settings = [line for line in unit.splitlines() if not line.startswith("#")]

    # Type=notify makes systemd wait for READY=1 before it runs ExecReload's SIGHUP.
    assert "Type=notify" in settings
    assert "ExecReload=/bin/kill -HUP $MAINPID" in settings
    # relay serve reports from its first process only, which NotifyAccess=main (the default) accepts.
    assert not any(line.startswith("NotifyAccess=") for line in settings)


def unit_settings(text: str) -> dict[str, dict[str, str]]:
    """Return each section of a systemd unit as a dict of its settings, the last one of each key winning."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current[key] = value
    return sections


def test_service_restart_loop_ends() -> None:
    # Without these keys systemd allows 5 starts within 10 s (systemd.unit(5)), then stops restarting the unit.
    unit = unit_settings((REPO_ROOT / "examples" / "relay.service").read_text())
    interval = float(unit["Unit"].get("StartLimitIntervalSec", "10"))
    burst = int(unit["Unit"].get("StartLimitBurst", "5"))
    restart_delay = float(unit["Service"]["RestartSec"])

    assert unit["Service"]["Restart"] == "on-failure"
    # A relay that fails at every start is started again every RestartSec,
    # so the limit trips only when that many starts fit into the interval.
    assert (burst - 1) * restart_delay < interval


def test_service_stop_timeout_exceeds_grace() -> None:
    unit = unit_settings((REPO_ROOT / "examples" / "relay.service").read_text())
    grace = ServerConfig().shutdown_grace

    # Past TimeoutStopSec systemd sends SIGKILL, which would cut the grace of sessions in DATA short.
    assert float(unit["Service"]["TimeoutStopSec"]) > grace + 10
    assert unit["Service"]["KillMode"] == "mixed"
    assert unit["Service"]["KillSignal"] == "SIGTERM"


def test_notify_reload_drop_in_replaces_kill() -> None:
    drop_in = REPO_ROOT / "examples" / "relay.service.d" / "notify-reload.conf"
    settings = [line for line in drop_in.read_text().splitlines() if line and not line.startswith("#")]

    assert settings[0] == "[Service]"
    assert "Type=notify-reload" in settings
    # An empty ExecReload= drops the unit's kill -HUP; systemd then sends the one SIGHUP itself.
    assert "ExecReload=" in settings


@pytest.mark.parametrize("name", ["relay-throughput.toml", "relay-smarthost.toml"])
def test_service_example_paths_writable(name: str) -> None:
    # Under the unit the working directory is /, so default relative paths would land in read-only /.
    unit = (REPO_ROOT / "examples" / "relay.service").read_text()
    writable = [line.partition("=")[2].split() for line in unit.splitlines() if line.startswith("ReadWritePaths=")]
    text = (REPO_ROOT / "examples" / name).read_text()

    for section, key in (("spool", "path"), ("local", "maildir_root")):
        value = re.search(rf"^\[{section}\][^\[]*?^{key} = \"([^\"]+)\"", text, re.MULTILINE | re.DOTALL)
        assert value is not None, f"{name} does not set [{section}] {key}"
        assert value.group(1) in writable[0], f"{name}: [{section}] {key} is not in ReadWritePaths"
