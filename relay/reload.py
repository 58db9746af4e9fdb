"""Configuration reload on SIGHUP: re-read the file, keep what needs a restart.

``relay serve`` re-reads its config file when it gets SIGHUP.  Settings that
sessions and the scheduler read afresh take effect for new sessions and
the next deliveries: domains, trusted networks, credentials, aliases, the
transport table, relayhost, limits, timeouts and the TLS certificate.
Sessions already open keep the settings they started with, so no
connection is dropped.

Settings bound to sockets, processes or files opened at start keep their
running values, and a differing value in the file is logged as needing a
restart: the listeners, ``server.workers``, ``delivery.enabled`` and the
``[spool]``, ``[admin]`` and ``[log]`` sections.  A value
given on the command line (``Config.overrides``) is kept without that
message.  An invalid file is rejected as a whole: every error is logged and
the running config stays in force.  So is a config whose TLS
certificate, credentials file, aliases file, delivery CA bundle or smart
host password cannot be loaded, or whose ``maildir_root`` is a file
(``check_files``), or whose routing or local delivery the scheduler cannot
build, in every process alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
from dataclasses import dataclass, field

from relay.aliases import AliasError, parse_aliases, remember_checked
from relay.config import Config, ConfigError, directory_problem, load_config, locate_error, read_error
from relay.delivery.router import read_password
from relay.log import log_event
from relay.smtp.auth import CredentialsError, read_credentials
from relay.smtp.tls import TLSSetupError, server_context

logger = logging.getLogger("relay.reload")


class FileCheckError(Exception):
    """A file that the config names cannot be loaded, or its ``maildir_root`` cannot be a directory.

    The files are the TLS certificate and key, credentials, aliases, CA bundle and smart host password.

    ``errors`` has one line for each problem found.
    """

    def __init__(self, *errors: str) -> None:
        super().__init__("; ".join(errors))
        self.errors = list(errors)


def check_files(config: Config) -> None:
    """Load the files the config names as ``relay serve`` will; raise FileCheckError with the reason.

    ``relay check-config`` and ``relay serve`` run this before they start,
    and every process before it applies a reload.
    """
    # Every file is checked, and every problem reported at once, each after
    # the key that names the file, as the config's own errors are.
    errors: list[str] = []
    try:
        if any(listener.tls != "none" for listener in config.listeners):
            server_context(config.tls)
    except TLSSetupError as exc:
        errors.append(f"{exc.config_key}: {exc}")
    if config.auth.password_file:
        try:
            # Parsed only: a CredentialStore would also compute a scrypt hash.
            read_credentials(config.auth.password_file)
        except CredentialsError as exc:
            errors.append(f"auth.password_file: {exc}")
    errors.extend(_delivery_file_errors(config))
    # RCPT would reply 451 for every local user of such a root, and delivery would defer them all.
    maildir_problem = directory_problem(config.local.maildir_root)
    if maildir_problem is not None:
        errors.append(f"local.maildir_root: {maildir_problem}")
    path = config.local.aliases
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                remember_checked(path, parse_aliases(handle.read(), config.local.alias_expansion_limit))
        except OSError as exc:
            errors.append(f"local.aliases: {read_error(path, exc)}")
        except UnicodeDecodeError as exc:
            errors.append(f"local.aliases: cannot read {path}: {exc}")
        except AliasError as exc:
            errors.extend(f"local.aliases: {path}: {error}" for error in exc.errors)
    if errors:
        raise FileCheckError(*errors)


def _delivery_file_errors(config: Config) -> list[str]:
    """Load the CA bundle and the smart host's password as the delivery process will; return the problems."""
    errors: list[str] = []
    delivery = config.delivery
    if delivery.tls_ca_file:
        # Named like the config's own errors (section.key: problem), then the file.
        path = delivery.tls_ca_file
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as exc:
            errors.append(f"delivery.tls_ca_file: {path} is not a bundle of PEM CA certificates ({exc})")
        except OSError as exc:
            errors.append(f"delivery.tls_ca_file: {read_error(path, exc)}")
    if delivery.relayhost_password_file:
        # Read even without relayhost_username, because the scheduler's router
        # reads the file whenever a relayhost is set, and a file it cannot
        # decode would stop the scheduler at start or fail its reload.
        path = delivery.relayhost_password_file
        try:
            password = read_password(path)
        except OSError as exc:
            errors.append(f"delivery.relayhost_password_file: {read_error(path, exc)}")
        except UnicodeDecodeError as exc:
            errors.append(
                f"delivery.relayhost_password_file: {path} is not valid UTF-8: byte 0x{exc.object[exc.start]:02x}"
                f" at offset {exc.start}; save the password as UTF-8 text"
            )
        else:
            if delivery.relayhost_username and not password:
                errors.append(
                    f"delivery.relayhost_password_file: the first line of {path} is empty; put the password there"
                )
    return errors


# The process that logs what every process finds in the same file: its
# errors and the settings kept until a restart.  The others log them at
# debug level, so that one bad file costs one error line, not one per process.
FILE_REPORTER = 0


@dataclass
class ReloadResult:
    """A reload's outcome: the config to apply (None when rejected) and what was kept."""

    config: Config | None
    errors: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    # False for an error of this process alone (its scheduler rejected the config), which every process logs.
    file_errors: bool = True


def reload_config(running: Config) -> ReloadResult:
    """Re-read the running config's file and merge in the settings that need a restart."""
    if running.source is None:
        return ReloadResult(None, ["no config file was given at start; there is nothing to re-read"])
    try:
        loaded = load_config(running.source)
    except ConfigError as exc:
        # load_config's "pass an existing config file" is advice for a start;
        # a running relay has a config, so the fix is to put the file back.
        if not os.path.exists(running.source):
            return ReloadResult(
                None,
                [f"{running.source}: file not found; the running config stays in force, so restore the file"
                 " and reload again"],
            )
        return ReloadResult(None, exc.errors)
    try:
        check_files(loaded.replace(listeners=running.listeners))
    except FileCheckError as exc:
        # "FILE:section.key: problem", the form of load_config's errors above.
        return ReloadResult(None, [locate_error(loaded, error) for error in exc.errors])

    changed = []
    if loaded.listeners != running.listeners:
        changed.append("listener")
    if loaded.server.workers != running.server.workers:
        changed.append("server.workers")
    # Every [spool] key, not only the path, is read once when the spool is opened at start.
    for section in ("spool", "admin", "log"):
        for setting in dataclasses.fields(getattr(loaded, section)):
            if getattr(getattr(loaded, section), setting.name) != getattr(getattr(running, section), setting.name):
                changed.append(f"{section}.{setting.name}")
    if loaded.delivery.enabled != running.delivery.enabled:
        changed.append("delivery.enabled")
    # A value given on the command line was never the file's, so keeping it is no news.
    needs_restart = [name for name in changed if name not in running.overrides]

    merged = loaded.replace(
        listeners=running.listeners,
        spool=running.spool,
        server=dataclasses.replace(loaded.server, workers=running.server.workers),
        admin=running.admin,
        log=running.log,
        delivery=dataclasses.replace(loaded.delivery, enabled=running.delivery.enabled),
        overrides=running.overrides,
    )
    if merged.delivery.enabled:
        error = _scheduler_error(merged)
        if error is not None:
            return ReloadResult(None, [error])
    return ReloadResult(merged, [], needs_restart)


def _scheduler_error(config: Config) -> str | None:
    """Return why the scheduler would reject ``config``, or None.

    Checked in every process, not only in the one that runs the scheduler,
    so that the listeners reject what the scheduler rejects.  A file that
    changes between two processes' reads can still split them.
    """
    # Imported here: the scheduler loads dnspython and the SMTP client, which
    # the other users of this module (check-config, sendmail) do not need.
    from relay.delivery.scheduler import Scheduler

    try:
        Scheduler.check_config(config)
    except Exception as exc:
        # Any failure of the build means the scheduler would keep its old config.
        return f"the scheduler cannot use it: {type(exc).__name__}: {exc}"
    return None


def log_reload(result: ReloadResult, source: str | None, worker: int, summarized: bool = False) -> None:
    """Log the outcome: one line per error, or one line for the applied reload.

    Errors in the file and the settings kept are logged at their own level
    only by ``FILE_REPORTER``, worker 0.  With ``summarized`` (several
    processes, whose supervisor logs ``reload_summary``), ``reloaded`` is a
    debug line.
    """
    reporter = worker == FILE_REPORTER
    if result.config is None:
        level = logging.ERROR if reporter or not result.file_errors else logging.DEBUG
        for error in result.errors:
            log_event(logger, "reload_failed", level, worker=worker, file=source, error=error)
        return
    if result.needs_restart:
        log_event(
            logger,
            "reload_needs_restart",
            logging.WARNING if reporter else logging.DEBUG,
            worker=worker,
            file=source,
            kept=result.needs_restart,
        )
    log_event(logger, "reloaded", logging.DEBUG if summarized else logging.INFO, worker=worker, file=source)
