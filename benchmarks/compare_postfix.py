"""A private Postfix instance for ``compare.py``: loopback only, relaying to a sink.

The instance has its own config, queue and data folders under a scratch
folder, listens on 127.0.0.1 only, never looks up DNS, has no local
delivery, and relays every message to ``[127.0.0.1]:DOWNSTREAM`` (an
smtp-sink).  Its queue is fsync'd as in production.  chroot is off so the
instance needs no copies of system files.  Postfix logs its own errors to
``maillog`` in the scratch folder (``maillog_file_prefixes`` must allow
that path, or ``postfix check`` fails without a word on stderr).  Starting it needs root: the
master runs as root and the other daemons as the ``postfix`` user.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/spool
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench-postfix.localdomain
mydomain = localdomain
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
mynetworks_style = host
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{downstream}
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions =
smtpd_tls_security_level = none
smtp_tls_security_level = none
biff = no
append_dot_mydomain = no
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
"""

# Service table: the smtpd on the benchmark port plus the daemons that a
# relaying instance needs; chroot (the fifth column) is off everywhere.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
proxywrite unix - - n -     1 proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def _run(*command: str) -> None:
    completed = subprocess.run(command, capture_output=True, check=False, timeout=60)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {completed.stderr.decode().strip()[-300:]}")


def queue_empty(config: Path) -> bool:
    """Return True when the instance's queue is empty."""
    completed = subprocess.run(["postqueue", "-c", str(config), "-p"], capture_output=True, check=False, timeout=30)
    return b"Mail queue is empty" in completed.stdout


@contextlib.contextmanager
def postfix_instance(base: Path, port: int, downstream: int, drain_timeout: float) -> Iterator[Callable[[], None]]:
    """Run Postfix on 127.0.0.1:port; yield a function that waits until its queue is empty."""
    config = base / "etc"
    for folder in (config, base / "spool", base / "data"):
        folder.mkdir(parents=True, exist_ok=True)
    # The daemons run as the postfix user, which must reach the queue through
    # base's parent, a scratch folder that tempfile makes private to root.
    for folder in (base.parent, base):
        folder.chmod(folder.stat().st_mode | 0o755)
    shutil.chown(base / "data", "postfix", "postfix")
    (config / "main.cf").write_text(MAIN_CF.format(base=base, downstream=downstream))
    (config / "master.cf").write_text(MASTER_CF.format(port=port))
    _run("postfix", "-c", str(config), "check")
    _run("postfix", "-c", str(config), "start")

    def drain() -> None:
        deadline = time.monotonic() + drain_timeout
        while not queue_empty(config):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix queue not empty after {drain_timeout:g} s")
            time.sleep(0.5)

    try:
        yield drain
    finally:
        subprocess.run(["postfix", "-c", str(config), "stop"], capture_output=True, check=False, timeout=60)
