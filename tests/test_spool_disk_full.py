"""A full disk gives the spool error, leaves no partial message, and passes once space is back."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from spool_helpers import PYTHON, TESTS, child_environment

CHILD = str(TESTS / "spool_children.py")
# A private mount namespace makes a mount vanish with the process, even if it is killed.
_PRIVATE_NAMESPACE = ("unshare", "--mount", "--propagation", "private")


def _steps(output: bytes) -> dict[str, dict[str, Any]]:
    steps = [orjson.loads(line) for line in output.splitlines()]
    return {str(step["step"]): step for step in steps}


def _check_steps(steps: dict[str, dict[str, Any]], failing_step: str) -> None:
    assert steps[failing_step]["error"] is not None, "the commit on a full disk did not fail"
    # Only the two messages committed with space left are in the spool: nothing partial.
    assert steps["check"]["ids"] == sorted([steps["small"]["queue_id"], steps["again"]["queue_id"]])
    assert steps["check"]["integrity"] == ["ok"]


def test_file_size_limit_gives_spool_error(tmp_path: Path) -> None:
    # RLIMIT_FSIZE needs no privileges: the child lowers its own limit, then raises it back.
    result = subprocess.run(
        [PYTHON, CHILD, "disk-full", str(tmp_path / "spool"), str(1024 * 1024)],
        capture_output=True,
        env=child_environment(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    steps = _steps(result.stdout)
    _check_steps(steps, "big")
    assert "error" in str(steps["big"]["error"])


def _can_mount_tmpfs(target: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "tmpfs",
            str(target),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


def test_full_tmpfs_gives_spool_error(tmp_path: Path) -> None:
    target = tmp_path / "small-fs"
    target.mkdir()
    if not _can_mount_tmpfs(target):
        pytest.skip("mounting a tmpfs in a private mount namespace is not permitted here")
    script = 'mount -t tmpfs -o size=2m tmpfs "$1" && exec "$2" "$3" filesystem-full "$1"'
    result = subprocess.run(
        [*_PRIVATE_NAMESPACE, "sh", "-c", script, "sh", str(target), PYTHON, CHILD],
        capture_output=True,
        env=child_environment(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    steps = _steps(result.stdout)
    _check_steps(steps, "full")
    assert "full" in str(steps["full"]["error"])
