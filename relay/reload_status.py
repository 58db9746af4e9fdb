"""The reload outcome of every process of ``relay serve`` with several workers.

Each worker and the delivery process re-read the config file on SIGHUP and
report to the supervisor, over the report pipe of ``relay.notify``, whether
they applied it and the fingerprint of the config they run afterwards.  The
supervisor's reporting thread passes each change to ``ReloadTracker``.  It
saves the outcomes to ``SPOOL/metrics/reload-status`` (when the admin
listener is on), where worker 0 reads them for ``/healthz`` and
``relay_config_last_reload_successful``.  Once every process has finished
the reload of a SIGHUP sent to the supervisor, it logs one ``reload_summary`` line.

The processes disagree when their fingerprints differ: some run the new
file and others the old one.  Every process runs the same checks on the
same file, so that happens only when the file changed between their reads,
or when a SIGHUP reached some processes and not the others.
With one worker there is no supervisor, and the worker's own outcome is
the whole story (``relay.admin``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from relay.config import Config
from relay.log import log_event

logger = logging.getLogger("relay.reload")

STATUS_FILE = "reload-status"


def config_fingerprint(config: Config) -> int:
    """Return a 64-bit digest of every setting in ``config``, equal in every process for equal settings."""
    # Sets are sorted, because their order depends on the hash seed.
    text = orjson.dumps(config, option=orjson.OPT_SORT_KEYS, default=_canonical)
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, (Path, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


def process_name(index: int, workers: int) -> str:
    """Return the name of child ``index`` in logs and ``/healthz``, where the delivery process follows the workers."""
    return "delivery" if index == workers else f"worker-{index}"


@dataclass(frozen=True)
class ProcessReload:
    """One process's latest reload: applied, rejected, or None before the first one, and its config's fingerprint."""

    name: str
    applied: bool | None
    config: int


@dataclass(frozen=True)
class ReloadStatus:
    """The latest reload outcome of every process."""

    processes: tuple[ProcessReload, ...]

    @property
    def applied(self) -> list[str]:
        return [process.name for process in self.processes if process.applied]

    @property
    def rejected(self) -> list[str]:
        return [process.name for process in self.processes if process.applied is False]

    def config_groups(self) -> list[list[str]]:
        """Return the process names grouped by the config they run, in the order the processes are numbered."""
        groups: dict[int, list[str]] = {}
        for process in self.processes:
            groups.setdefault(process.config, []).append(process.name)
        return list(groups.values())

    @property
    def successful(self) -> bool:
        """True when no process rejected its latest reload and all run the same config."""
        return not self.rejected and len(self.config_groups()) <= 1

    def healthz_lines(self) -> list[str]:
        """Return the lines that ``/healthz`` adds after ``ok``: none while the reload status is successful."""
        lines = []
        groups = self.config_groups()
        if len(groups) > 1:
            described = "; ".join(", ".join(group) for group in groups)
            lines.append(
                f"the processes run {len(groups)} different configs ({described}); fix the config file and"
                " send SIGHUP to the supervisor, the first relay process (see reload_summary)"
            )
        rejected = self.rejected
        if rejected:
            lines.append(
                f"the last config reload was rejected by {', '.join(rejected)}; the previous config stays in force"
                " there (see reload_failed)"
            )
        return lines

    def to_json(self) -> bytes:
        return orjson.dumps([[p.name, p.applied, p.config] for p in self.processes])

    @classmethod
    def from_json(cls, data: bytes) -> ReloadStatus:
        """Parse what ``to_json`` wrote; raise ValueError for anything else."""
        try:
            rows = orjson.loads(data)
            return cls(tuple(ProcessReload(str(name), applied, int(config)) for name, applied, config in rows))
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid reload status: {exc}") from None


def load_status(directory: Path) -> ReloadStatus | None:
    """Read the status the supervisor saved; return None before the first reload or when it cannot be read."""
    try:
        return ReloadStatus.from_json((directory / STATUS_FILE).read_bytes())
    except (OSError, ValueError):
        # Missing before the first reload.  The file is replaced whole, so a
        # reader never sees half of one.
        return None


class ReloadTracker:
    """The supervisor's record of its children's reloads: the status file and the ``reload_summary`` line."""

    def __init__(self, workers: int, children: int, config: Config, directory: Path | None) -> None:
        self.workers = workers
        self.source = config.source
        self.directory = directory
        start = config_fingerprint(config)
        self.processes = [ProcessReload(process_name(index, workers), None, start) for index in range(children)]
        self._save_failed = False
        if directory is not None:
            # An earlier run's file would describe processes that are gone.
            try:
                (directory / STATUS_FILE).unlink()
            except FileNotFoundError:
                pass

    def update(self, results: dict[int, tuple[bool, int]], round_finished: bool) -> None:
        """Record each child's latest result (applied, fingerprint), and log the summary when ``round_finished``."""
        for index, (applied, config) in results.items():
            if 0 <= index < len(self.processes):
                self.processes[index] = ProcessReload(self.processes[index].name, applied, config)
        status = ReloadStatus(tuple(self.processes))
        self._save(status)
        if round_finished:
            self._log_summary(status)

    def _save(self, status: ReloadStatus) -> None:
        if self.directory is None:
            return
        path = self.directory / STATUS_FILE
        temporary = self.directory / f".{STATUS_FILE}.{os.getpid()}.tmp"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(status.to_json())
            os.replace(temporary, path)
        except OSError as exc:
            # /healthz then shows an older outcome.  Logged once, because a full disk would repeat it at every reload.
            if not self._save_failed:
                self._save_failed = True
                log_event(logger, "reload_status_failed", logging.WARNING, file=str(path), error=str(exc))

    def _log_summary(self, status: ReloadStatus) -> None:
        groups = status.config_groups()
        if len(groups) > 1:
            level = logging.ERROR
        elif status.rejected:
            level = logging.WARNING
        else:
            level = logging.INFO
        log_event(
            logger,
            "reload_summary",
            level,
            file=self.source,
            applied=status.applied,
            rejected=status.rejected,
            configs=len(groups),
        )
