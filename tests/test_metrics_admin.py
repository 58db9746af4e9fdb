"""Metrics exposition, cross-process snapshots, the admin listener and `relay status`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, free_port
from relay import metrics
from relay.admin import AdminServer
from relay.log import log_event
from relay.spool import DeliveryResult, Envelope, Outcome, Recipient, Spool


def families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Parse exposition text into {sample name: {sorted labels: value}}."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_registry_renders_parseable_text() -> None:
    registry = metrics.Registry()
    counter = registry.counter("relay_test_total", "A test counter.", ["reason"])
    gauge = registry.gauge("relay_test_active", "A test gauge.")
    histogram = registry.histogram("relay_test_seconds", "A test histogram.", (0.1, 1.0))

    counter.inc(reason='5.7.1 "quoted"\nline')
    counter.inc(2, reason="5.1.1")
    gauge.set(3)
    histogram.observe(0.05)
    histogram.observe(0.5)
    histogram.observe(5)

    samples = families(registry.render())
    assert samples["relay_test_total"][(("reason", "5.1.1"),)] == 2
    assert samples["relay_test_total"][(("reason", '5.7.1 "quoted"\nline'),)] == 1
    assert samples["relay_test_active"][()] == 3
    assert samples["relay_test_seconds_bucket"][(("le", "0.1"),)] == 1
    assert samples["relay_test_seconds_bucket"][(("le", "1.0"),)] == 2
    assert samples["relay_test_seconds_bucket"][(("le", "+Inf"),)] == 3
    assert samples["relay_test_seconds_count"][()] == 3
    assert samples["relay_test_seconds_sum"][()] == pytest.approx(5.55)


def test_snapshots_of_other_processes_add_up(tmp_path: Path) -> None:
    first = metrics.Registry()
    second = metrics.Registry()
    for registry, amount in ((first, 1), (second, 4)):
        registry.counter("relay_test_total", "A test counter.", ["role"]).inc(amount, role="mx")
        registry.histogram("relay_test_seconds", "A test histogram.", (1.0,)).observe(0.5)
    metrics.save_snapshot(second, tmp_path, "worker-1")
    (tmp_path / "worker-2.json").write_bytes(b"{truncated")

    others = metrics.load_snapshots(tmp_path, exclude="worker-0")
    samples = families(first.render(others))

    assert samples["relay_test_total"][(("role", "mx"),)] == 5
    assert samples["relay_test_seconds_count"][()] == 2


def test_wrong_labels_raise() -> None:
    registry = metrics.Registry()
    counter = registry.counter("relay_test_total", "A test counter.", ["role"])

    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(listener="x")


def fill_spool(directory: Path) -> None:
    spool = Spool.open(directory)
    try:
        envelope = Envelope(
            sender="a@example.test",
            recipients=(Recipient("x@example.net"), Recipient("y@example.net"), Recipient("z@example.org")),
        )
        spool.commit_blocking(envelope, b"Subject: one\r\n\r\nbody\r\n")
        spool.commit_blocking(Envelope(sender="", recipients=(Recipient("w@example.net"),)), b"x\r\n")
    finally:
        spool.close()


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def run_admin(tmp_path: Path, accepting: list[bool]) -> dict[str, tuple[int, str]]:
    server = AdminServer(tmp_path / "spool", tmp_path / "snapshots", "worker-0", lambda: accepting[0])
    port = free_port()
    await server.start("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    base = f"http://127.0.0.1:{port}"
    try:
        results = {}
        for path in ("/metrics", "/healthz", "/nope"):
            results[path] = await loop.run_in_executor(None, fetch, base + path)
        accepting[0] = False
        results["/healthz stopped"] = await loop.run_in_executor(None, fetch, base + "/healthz")

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n")
        await writer.drain()
        results["oversized"] = (0, (await reader.read()).decode())
        writer.close()
        return results
    finally:
        await server.close()


def test_admin_serves_metrics_and_health(tmp_path: Path) -> None:
    fill_spool(tmp_path / "spool")
    metrics.messages_received.inc()

    results = asyncio.run(run_admin(tmp_path, [True]))

    status, body = results["/metrics"]
    assert status == 200
    samples = families(body)
    assert samples["relay_queue_recipients"][(("state", "queued"),)] == 4
    assert samples["relay_queue_recipients"][(("state", "deferred"),)] == 0
    assert samples["relay_queue_oldest_age_seconds"][(("state", "queued"),)] >= 0
    assert samples["relay_messages_received_total"][()] >= 1
    assert results["/healthz"] == (200, "ok\n")
    assert results["/nope"][0] == 404
    assert results["/healthz stopped"][0] == 503
    assert results["oversized"][1].startswith("HTTP/1.1 431 ")


async def defer_one(directory: Path) -> None:
    spool = Spool.open(directory)
    try:
        claims = await spool.claim("test", limit=10)
        first = claims[0]
        result = DeliveryResult(first.queue_id, 0, Outcome.DEFERRED, "451 4.3.0 busy", "mx", next_attempt=2e9)
        await spool.record_results([result], lease_token=first.lease_token)
    finally:
        await spool.aclose()


def test_status_command(tmp_path: Path) -> None:
    fill_spool(tmp_path / "spool")
    asyncio.run(defer_one(tmp_path / "spool"))
    command = [sys.executable, "-m", "relay", "status", "--spool", str(tmp_path / "spool")]
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}

    text = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    document = orjson.loads(subprocess.run([*command, "--json"], capture_output=True, env=env, check=True).stdout)

    assert "Spool: 2 message(s), 4 recipient(s)" in text
    assert "Top destinations by backlog:" in text
    assert document["recipients"]["queued"] == 3
    assert document["recipients"]["deferred"] == 1
    assert document["destinations"][0]["domain"] == "example.net"
    assert document["destinations"][0]["queued"] + document["destinations"][0]["deferred"] == 3


def test_status_json_times_match_queue_list(tmp_path: Path) -> None:
    # Both commands give times as UTC ISO 8601 text, so one parser reads both.
    fill_spool(tmp_path / "spool")
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    spool = ["--spool", str(tmp_path / "spool"), "--json"]

    status = subprocess.run([sys.executable, "-m", "relay", "status", *spool], capture_output=True, env=env, check=True)
    listing = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "list", *spool], capture_output=True, env=env, check=True
    )

    document = orjson.loads(status.stdout)
    arrivals = [orjson.loads(line)["arrival"] for line in listing.stdout.splitlines()]
    assert len(arrivals) == 2
    assert all(isinstance(arrival, str) and arrival.endswith("Z") for arrival in arrivals)
    assert document["oldest_arrival"] == {"queued": min(arrivals)}
    by_domain = {item["domain"]: item["oldest_arrival"] for item in document["destinations"]}
    assert by_domain == {"example.net": min(arrivals), "example.org": arrivals[0]}


def test_status_top_limits_destinations(tmp_path: Path) -> None:
    fill_spool(tmp_path / "spool")
    command = [sys.executable, "-m", "relay", "status", "--spool", str(tmp_path / "spool"), "--json"]
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}

    every = orjson.loads(subprocess.run(command, capture_output=True, env=env, check=True).stdout)
    first = orjson.loads(subprocess.run([*command, "--top", "1"], capture_output=True, env=env, check=True).stdout)
    negative = subprocess.run([*command, "--top", "-1"], capture_output=True, text=True, env=env, check=False)

    assert len(every["destinations"]) == 2
    assert first["destinations"] == every["destinations"][:1]
    assert negative.returncode == 2
    assert "--top: expected a whole number of at least 1, got '-1'" in negative.stderr


def test_status_missing_spool(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "relay", "status", "--spool", str(tmp_path / "none")]

    result = subprocess.run(command, capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)}, check=False)

    assert result.returncode == 1
    assert "no spool in" in result.stderr


def test_log_events_move_counters() -> None:
    logger = logging.getLogger("relay.test")
    before_delivered = metrics.recipients_delivered.values.get((), 0.0)
    before_rejected = metrics.messages_rejected.values.get(("RCPT", "5.7.1"), 0.0)
    before_attempts = metrics.destination_attempts.values.get(("example.net", "deferred"), 0.0)

    log_event(logger, "delivered", queue_id="Q", to="a@example.net", delay=1.5, reply="250 ok")
    log_event(logger, "reject", session="s", command="RCPT", reply="554 5.7.1 Relay access denied")
    log_event(logger, "deferred", queue_id="Q", to="b@Example.NET", delay=2.0, reply="451 4.3.0 later")

    assert metrics.recipients_delivered.values[()] == before_delivered + 1
    assert metrics.messages_rejected.values[("RCPT", "5.7.1")] == before_rejected + 1
    assert metrics.destination_attempts.values[("example.net", "deferred")] == before_attempts + 1


def test_reject_command_label_is_verb() -> None:
    logger = logging.getLogger("relay.test")
    before_rcpt = metrics.messages_rejected.values.get(("RCPT", "5.1.1"), 0.0)
    before_other = metrics.messages_rejected.values.get(("other", "5.5.1"), 0.0)

    log_event(logger, "reject", session="s", command="RCPT TO:<carol@localhost>", reply="550 5.1.1 No such user")
    log_event(logger, "reject", session="s", command="XYZZY", reply="500 5.5.1 Unknown command")

    assert metrics.messages_rejected.values[("RCPT", "5.1.1")] == before_rcpt + 1
    assert metrics.messages_rejected.values[("other", "5.5.1")] == before_other + 1
    assert not any("carol" in command for command, _status in metrics.messages_rejected.values)


def test_destination_label_capped() -> None:
    label = metrics.BoundedLabel(2)

    assert label("example.net") == "example.net"
    assert label("example.org") == "example.org"
    assert label("example.com") == "other"
    # The first values keep their series; "other" stays "other".
    assert label("example.net") == "example.net"
    assert label("example.com") == "other"


def test_attempts_past_cap_count_as_other(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("relay.test")
    monkeypatch.setattr(metrics, "destination_label", metrics.BoundedLabel(1))
    before_other = metrics.destination_attempts.values.get(("other", "delivered"), 0.0)

    log_event(logger, "delivered", queue_id="Q", to="a@first.example", delay=1.0, reply="250 ok")
    for number in range(3):
        log_event(logger, "delivered", queue_id="Q", to=f"a@d{number}.example", delay=1.0, reply="250 ok")

    assert metrics.destination_attempts.values[("first.example", "delivered")] >= 1
    assert metrics.destination_attempts.values[("other", "delivered")] == before_other + 3
    assert ("d0.example", "delivered") not in metrics.destination_attempts.values


def test_unlabelled_series_start_at_zero() -> None:
    registry = metrics.Registry()
    registry.counter("relay_test_total", "A test counter.")
    registry.gauge("relay_test_active", "A test gauge.")
    registry.histogram("relay_test_seconds", "A test histogram.", (0.1, 1.0))
    registry.counter("relay_test_by_reason_total", "A labelled counter.", ["reason"])

    samples = families(registry.render())

    assert samples["relay_test_total"][()] == 0
    assert samples["relay_test_active"][()] == 0
    assert samples["relay_test_seconds_bucket"][(("le", "+Inf"),)] == 0
    assert samples["relay_test_seconds_count"][()] == 0
    # A labelled series has no sample until a label value is known.
    assert "relay_test_by_reason_total" not in samples


async def _raw_request(port: int, request: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    response = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    return response


def test_admin_answers_post_and_broken_metrics(tmp_path: Path) -> None:
    async def main() -> tuple[str, str]:
        server = AdminServer(tmp_path / "spool", tmp_path / "snapshots", "worker-0", lambda: True)
        port = free_port()
        await server.start("127.0.0.1", port)
        try:
            post = await _raw_request(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")

            # Any failure while rendering gets a 500 response, never silence and an open socket.
            async def broken() -> str:
                raise ValueError("snapshot with a bad label")

            server.render_metrics = broken  # type: ignore[method-assign]
            failed = await _raw_request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            return post, failed
        finally:
            await server.close()

    post, failed = asyncio.run(main())

    # RFC 9110 section 15.5.6: a 405 lists the allowed methods.
    assert post.startswith("HTTP/1.1 405 ")
    assert "\r\nAllow: GET, HEAD\r\n" in post
    assert failed.startswith("HTTP/1.1 500 ")


def test_status_closed_pipe_is_quiet(tmp_path: Path) -> None:
    fill_spool(tmp_path / "spool")
    command = f"{sys.executable} -m relay status --json --spool {tmp_path / 'spool'} | head -c 0"

    result = subprocess.run(
        command, shell=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        timeout=60, check=False,
    )

    assert "Traceback" not in result.stderr
    assert result.stderr == ""


def test_admin_request_head_rules(tmp_path: Path) -> None:
    async def main() -> dict[str, str]:
        server = AdminServer(tmp_path / "spool", tmp_path / "snapshots", "worker-0", lambda: True)
        port = free_port()
        await server.start("127.0.0.1", port)
        requests = {
            "empty lines first": b"\r\n\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            "no host, 1.1": b"GET /healthz HTTP/1.1\r\nAccept: */*\r\n\r\n",
            "no host, 1.0": b"GET /healthz HTTP/1.0\r\n\r\n",
            "two hosts": b"GET /healthz HTTP/1.1\r\nHost: x\r\nhost: y\r\n\r\n",
            "blank before colon": b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
            "folded line": b"GET /healthz HTTP/1.1\r\nHost: x\r\n y\r\n\r\n",
            "only empty lines": b"\r\n" * 40,
            # The body of a refused POST is read before the close, so the 405 arrives.
            "post with body": b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n"
            + b"b" * 300_000,
            # Far past the 8 KiB head limit: the whole request is sent before the reply is read.
            "huge header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 300_000 + b"\r\n\r\n",
            # RFC 9112 section 3: a request-target too long to parse gets 414, not 431.
            "long target": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            "long target, empty lines first": b"\r\n\r\nGET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
            # RFC 9112 section 3.2.2: a server accepts the absolute form, as sent to a proxy.
            "absolute form": b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "absolute form, upper-case scheme": b"GET HTTP://relay.test/metrics?x=1 HTTP/1.0\r\n\r\n",
            "absolute form, no path": b"GET http://relay.test HTTP/1.0\r\n\r\n",
        }
        try:
            return {name: await _raw_request(port, request) for name, request in requests.items()}
        finally:
            await server.close()

    responses = asyncio.run(main())

    assert responses["empty lines first"].startswith("HTTP/1.1 200 ")
    assert responses["no host, 1.1"].startswith("HTTP/1.1 400 ")
    assert "Host" in responses["no host, 1.1"]
    assert responses["no host, 1.0"].startswith("HTTP/1.1 200 ")
    assert responses["two hosts"].startswith("HTTP/1.1 400 ")
    assert responses["blank before colon"].startswith("HTTP/1.1 400 ")
    assert responses["folded line"].startswith("HTTP/1.1 400 ")
    assert responses["only empty lines"].startswith("HTTP/1.1 400 ")
    assert responses["post with body"].startswith("HTTP/1.1 405 ")
    assert responses["huge header"].startswith("HTTP/1.1 431 ")
    assert responses["long target"].startswith("HTTP/1.1 414 ")
    assert responses["long target, empty lines first"].startswith("HTTP/1.1 414 ")
    assert responses["absolute form"].startswith("HTTP/1.1 200 ")
    assert responses["absolute form"].endswith("\r\n\r\nok\n")
    assert responses["absolute form, upper-case scheme"].startswith("HTTP/1.1 200 ")
    assert "# TYPE relay_messages_received_total counter" in responses["absolute form, upper-case scheme"]
    assert responses["absolute form, no path"].startswith("HTTP/1.1 404 ")


def test_admin_client_reset_is_quiet(tmp_path: Path) -> None:
    # uvloop raises RuntimeError, not ConnectionError, when writing to a reset client.
    async def main() -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        server = AdminServer(tmp_path / "spool", tmp_path / "snapshots", "worker-0", lambda: True)
        port = free_port()
        await server.start("127.0.0.1", port)
        try:
            for _ in range(20):
                client = socket.create_connection(("127.0.0.1", port))
                client.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # no Host: a 400
                # Linger 0: close() sends a reset instead of a FIN.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
            await asyncio.sleep(0.5)
        finally:
            await server.close()
        return errors

    assert uvloop.run(main()) == []


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def test_sink_only_admin_creates_no_spool(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    temporary = tmp_path / "tmp"
    workdir.mkdir()
    temporary.mkdir()
    smtp_port, admin_port = free_port(), free_port()
    config = workdir / "relay-sink.toml"
    # No [spool] section: the default path, ./relay-spool, would be in the working directory.
    config.write_text(
        "[server]\nhostname = \"sink.example.test\"\nworkers = 2\n"
        f"[[listener]]\naddress = \"127.0.0.1:{smtp_port}\"\nrole = \"sink\"\n"
        f"[admin]\naddress = \"127.0.0.1:{admin_port}\"\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(temporary)}
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        cwd=workdir, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        connections: dict[tuple[tuple[str, str], ...], float] = {}
        deadline = time.monotonic() + 20
        sent = False
        while time.monotonic() < deadline:
            try:
                if not sent:
                    for _ in range(4):
                        with socket.create_connection(("127.0.0.1", smtp_port), timeout=5) as client:
                            client.recv(512)
                            client.sendall(b"QUIT\r\n")
                            client.recv(512)
                    sent = True
                connections = families(_scrape(f"http://127.0.0.1:{admin_port}/metrics")).get(
                    "relay_connections_total", {}
                )
            except OSError:
                pass
            # The other worker's connections arrive through its snapshot, every few seconds.
            if sum(connections.values()) == 4:
                break
            time.sleep(0.25)
        assert sum(connections.values()) == 4
        assert os.listdir(temporary) != []
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)

    assert process.returncode == 0, stderr.decode(errors="replace")
    assert sorted(os.listdir(workdir)) == ["relay-sink.toml"]
    # The snapshots' temporary folder is removed on exit.
    assert os.listdir(temporary) == []


def _start_sink_only_serve(workdir: Path, temporary: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start a sink-only ``relay serve`` with an admin listener; return it once /healthz responds."""
    smtp_port, admin_port = free_port(), free_port()
    config = workdir / "relay-sink.toml"
    config.write_text(
        f"[[listener]]\naddress = \"127.0.0.1:{smtp_port}\"\nrole = \"sink\"\n"
        f"[admin]\naddress = \"127.0.0.1:{admin_port}\"\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(temporary)}
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        cwd=workdir, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            _scrape(f"http://127.0.0.1:{admin_port}/healthz")
            return process, admin_port
        except OSError:
            time.sleep(0.1)
    process.kill()
    _, stderr = process.communicate(timeout=30)
    raise AssertionError(f"relay serve did not respond to /healthz: {stderr.decode(errors='replace')[-2000:]}")


def _age(folder: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(folder, (past, past))


def test_sink_only_removes_stale_metrics_folder(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    temporary = tmp_path / "tmp"
    workdir.mkdir()
    temporary.mkdir()

    # A process killed with SIGKILL leaves its folder behind.
    killed, _ = _start_sink_only_serve(workdir, temporary)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=30)
    (stale,) = list(temporary.iterdir())
    assert stale.name.startswith(f"relay-metrics-{killed.pid}-")
    _age(stale, 3 * metrics.STALE_AFTER)
    # Not removed: the folder of a running process, and one changed too recently.
    running = temporary / f"relay-metrics-{os.getpid()}-running"
    running.mkdir()
    _age(running, 3 * metrics.STALE_AFTER)
    recent = temporary / f"relay-metrics-{killed.pid}-recent"
    recent.mkdir()

    process, _ = _start_sink_only_serve(workdir, temporary)
    process.terminate()
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 0, stderr.decode(errors="replace")
    assert not stale.exists()
    assert running.is_dir()
    assert recent.is_dir()
    assert sorted(path.name for path in temporary.iterdir()) == sorted([running.name, recent.name])
    assert b"metrics_folder_removed" in stderr
    assert str(killed.pid).encode() in stderr


async def _hold_and_overflow(port: int, server: AdminServer) -> tuple[str, str]:
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(server.max_connections)]
    try:
        # The server shares this loop: a pause lets it start serving the idle ones first.
        await asyncio.sleep(0.2)
        refused = await asyncio.wait_for(_raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\n\r\n"), 2)
    finally:
        for _, writer in idle:
            writer.close()
    await asyncio.sleep(0.2)
    served = await asyncio.wait_for(_raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\n\r\n"), 2)
    return refused, served


def test_admin_caps_open_connections(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[str, str]:
        server = AdminServer(tmp_path / "spool", tmp_path / "snapshots", "worker-0", lambda: True, max_connections=3)
        port = free_port()
        await server.start("127.0.0.1", port)
        try:
            return await _hold_and_overflow(port, server)
        finally:
            await server.close()

    with caplog.at_level(logging.WARNING, logger="relay.admin"):
        refused, served = asyncio.run(scenario())

    # Idle clients at the limit cannot hold the listener, and each extra one costs a socket only briefly.
    assert refused.startswith("HTTP/1.1 503 "), refused
    assert "too many admin connections" in refused
    assert served.startswith("HTTP/1.1 200 "), served
    busy = [record for record in caplog.records if getattr(record, "event", None) == "admin_busy"]
    assert len(busy) == 1
