"""AUTH credentials and the SASL PLAIN and LOGIN exchanges.

Credentials file: one ``user:hash`` line per user, written by ``relay passwd``.
The hash is ``scrypt$N$r$p$SALT$KEY`` with SALT and KEY in base64, made by
``hashlib.scrypt`` with a random 16-octet salt.  N=2**14, r=8, p=1 are the
interactive-login parameters of RFC 7914 section 2 (16 MiB and tens of
milliseconds a check), so the server verifies in a thread pool, off the event
loop.  Lines starting with ``#`` and blank lines are ignored.  The file is
re-read when its modification time changes, so ``relay passwd`` takes effect
without a restart.

Mechanisms: PLAIN (RFC 4616) and LOGIN (the de-facto draft that Outlook and
most MUAs use), each with an optional initial response.  RFC 4954 section 4
rules apply: ``=`` is an empty response, ``*`` cancels (``501 5.7.0``), data
that is not base64 gets ``501 5.5.2``.  An authorization identity different
from the authentication identity is rejected with ``535 5.7.8`` because no
user may act for another here.  Passwords and raw responses are never logged or stored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
import tempfile
import threading
from dataclasses import dataclass

from relay.smtp import replies
from relay.smtp.replies import Reply

MECHANISMS = ("PLAIN", "LOGIN")

# RFC 7914 section 2: N=2**14, r=8, p=1 for interactive logins.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_OCTETS = 16
KEY_OCTETS = 32
# hashlib.scrypt raises ValueError above maxmem octets; 128 * N * r is 16 MiB here.
_SCRYPT_MAXMEM = 64 * 1024 * 1024

# Base64 of "Username:" and "Password:", the LOGIN prompts every client expects.
LOGIN_USERNAME_PROMPT = "VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT = "UGFzc3dvcmQ6"


class CredentialsError(Exception):
    """A credentials file that cannot be read or parsed."""


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Return the ``scrypt$N$r$p$SALT$KEY`` form of a password with a fresh salt."""
    salt = secrets.token_bytes(SALT_OCTETS)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_OCTETS, maxmem=_SCRYPT_MAXMEM)
    salt_text = base64.b64encode(salt).decode()
    key_text = base64.b64encode(key).decode()
    return f"scrypt${n}${r}${p}${salt_text}${key_text}"


def verify_password(password: str, encoded: str) -> bool:
    """Return whether password matches an encoded hash; a malformed hash never matches."""
    try:
        scheme, n_text, r_text, p_text, salt_text, key_text = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_text, validate=True)
        expected = base64.b64decode(key_text, validate=True)
        key = hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=int(n_text),
            r=int(r_text),
            p=int(p_text),
            dklen=len(expected),
            maxmem=_SCRYPT_MAXMEM,
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(key, expected)


def parse_credentials(text: str, filename: str) -> dict[str, str]:
    """Parse credentials file text into a user-to-hash mapping."""
    users: dict[str, str] = {}
    bad: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user or not _is_usable_hash(encoded):
            bad.append(str(number))
            continue
        users[user] = encoded
    if bad:
        # Every bad line at once, so one round of fixes clears them all.
        where = f"{filename}:{bad[0]}" if len(bad) == 1 else f"{filename}: lines {', '.join(bad)}"
        raise CredentialsError(f"{where}: expected USER:scrypt$N$r$p$SALT$KEY")
    return users


def _is_usable_hash(encoded: str) -> bool:
    """Return whether ``encoded`` has the ``scrypt$N$r$p$SALT$KEY`` form that ``verify_password`` can check.

    A truncated or hand-edited hash would otherwise load without an error
    and fail every login of its user like a wrong password.
    """
    fields = encoded.split("$")
    if len(fields) != 6 or fields[0] != "scrypt":
        return False
    n_text, r_text, p_text, salt_text, key_text = fields[1:]
    if not (n_text.isdecimal() and r_text.isdecimal() and p_text.isdecimal()):
        return False
    n, r, p = int(n_text), int(r_text), int(p_text)
    # hashlib.scrypt requires N to be a power of 2 above 1.  It raises when the
    # memory it needs exceeds maxmem: 128 * r * (N + p + 2) octets, measured with OpenSSL 3.0.19.
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * (n + p + 2) > _SCRYPT_MAXMEM:
        return False
    try:
        base64.b64decode(salt_text, validate=True)
        key = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(key) > 0


def read_credentials(path: str) -> dict[str, str]:
    """Read and parse a credentials file; raise CredentialsError when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise CredentialsError(_unreadable(path, exc)) from None
    except UnicodeDecodeError as exc:
        raise CredentialsError(
            f"{path}: invalid UTF-8 at byte {exc.start}; write USER:HASH lines with relay passwd"
        ) from None
    return parse_credentials(text, path)


def _unreadable(path: str, exc: OSError) -> str:
    return f"{path}: cannot be read: {exc.strerror or exc}; check [auth] password_file"


class CredentialStore:
    """The users of a credentials file, re-read when the file changes.

    ``verify`` is blocking (scrypt) and safe to call from worker threads.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, str] = {}
        self._reload()
        # Unknown users get a check against this hash, so timing does not reveal
        # which user names exist.
        self._dummy = hash_password(secrets.token_hex(8))

    def _reload(self) -> None:
        """Read the file again if it changed; raise CredentialsError when it cannot be read or parsed."""
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise CredentialsError(_unreadable(self.path, exc)) from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        self._users = read_credentials(self.path)
        self._stamp = stamp

    def verify(self, user: str, password: str) -> bool:
        """Check a user's password; raise CredentialsError if the file became unreadable."""
        with self._lock:
            self._reload()
            encoded = self._users.get(user)
        if encoded is None:
            verify_password(password, self._dummy)
            return False
        return verify_password(password, encoded)


def check_user_name(user: str) -> None:
    """Raise ValueError unless ``user`` can be a name in a credentials file."""
    if not user or ":" in user or any(ord(c) < 0x21 or c == "\x7f" for c in user):
        raise ValueError(f"invalid user name {user!r}: use printable characters without spaces or ':'")
    if user.startswith("#"):
        # The file would store the user's line as a comment, so the user could never log in.
        raise ValueError(f"invalid user name {user!r}: a name must not start with '#'")


def set_password(path: str, user: str, password: str) -> bool:
    """Add or replace one user's line in a credentials file; return whether it was new.

    The file is rewritten atomically (temporary file, fsync, rename), through
    a symbolic link if ``path`` is one.  A new file gets mode 0600.  A
    rewritten file keeps its mode, owner and group, so a server that reads it
    as another user (root:relay 0640, say) still can.  Raises CredentialsError
    when the owner or group cannot be kept.
    """
    check_user_name(user)
    try:
        with open(path, encoding="utf-8") as handle:
            existing: os.stat_result | None = os.fstat(handle.fileno())
            lines = handle.read().splitlines()
    except FileNotFoundError:
        existing = None
        lines = []
    except UnicodeDecodeError as exc:
        raise CredentialsError(f"{path}: invalid UTF-8 at byte {exc.start}; fix or remove that line") from None
    parse_credentials("\n".join(lines), path)

    entry = f"{user}:{hash_password(password)}"
    found = False
    for index, line in enumerate(lines):
        if line.strip().partition(":")[0] == user and not line.lstrip().startswith("#"):
            lines[index] = entry
            found = True
    if not found:
        lines.append(entry)

    # A symbolic link stays in place and its target is rewritten, so every path to the file reads the change.
    target = os.path.realpath(path)
    fd, temporary = tempfile.mkstemp(prefix=".passwd-", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _copy_access(temporary, existing, path)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    return not found


def _copy_access(temporary: str, existing: os.stat_result | None, path: str) -> None:
    """Give the new file the mode, owner and group of the one it replaces (mode 0600 for a new file)."""
    if existing is None:
        os.chmod(temporary, 0o600)
        return
    created = os.stat(temporary)
    if (created.st_uid, created.st_gid) != (existing.st_uid, existing.st_gid):
        try:
            os.chown(temporary, existing.st_uid, existing.st_gid)
        except PermissionError:
            raise CredentialsError(
                f"{path}: cannot keep its owner {existing.st_uid} and group {existing.st_gid}, so nothing changed;"
                " run relay passwd as root or as the owner of the file"
            ) from None
    os.chmod(temporary, stat.S_IMODE(existing.st_mode))


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send a 334 with this base64 text and wait for the client's next line."""

    text: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """The exchange is complete: check these credentials."""

    user: str
    password: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange ended without credentials; send this reply."""

    reply: Reply


SaslStep = Challenge | Credentials | Failure


def _decode_response(text: str) -> bytes | Failure:
    """Decode one client response: ``*`` cancels, ``=`` is empty, else strict base64."""
    if text == "*":
        return Failure(replies.AUTH_CANCELLED)
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return Failure(replies.AUTH_BAD_BASE64)


class SaslExchange:
    """One AUTH exchange, fed the initial response and each client line in turn."""

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported mechanism {mechanism}")
        self.mechanism = mechanism
        self._user: str | None = None

    def start(self, initial_response: str | None) -> SaslStep:
        if initial_response is None:
            if self.mechanism == "PLAIN":
                return Challenge("")
            return Challenge(LOGIN_USERNAME_PROMPT)
        return self.respond(initial_response)

    def respond(self, text: str) -> SaslStep:
        decoded = _decode_response(text)
        if isinstance(decoded, Failure):
            return decoded
        try:
            value = decoded.decode("utf-8")
        except UnicodeDecodeError:
            return Failure(replies.AUTH_FAILED)
        if self.mechanism == "PLAIN":
            return self._plain(value)
        if self._user is None:
            self._user = value
            return Challenge(LOGIN_PASSWORD_PROMPT)
        return self._finish(self._user, value)

    def _plain(self, message: str) -> SaslStep:
        # RFC 4616 section 2: [authzid] NUL authcid NUL passwd.
        parts = message.split("\0")
        if len(parts) != 3:
            return Failure(replies.AUTH_FAILED)
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            return Failure(replies.AUTH_FAILED)
        return self._finish(authcid, password)

    def _finish(self, user: str, password: str) -> SaslStep:
        if not user or not password:
            return Failure(replies.AUTH_FAILED)
        return Credentials(user, password)
