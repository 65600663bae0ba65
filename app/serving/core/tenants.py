"""Tenants (SPEC section 12): who is calling, from `--api_keys FILE`.

The file holds one key per line, `TENANT TOKEN` or `TENANT sha256:HEX` (the token's SHA-256, so that the
file itself need not hold the secret), optionally followed by `weight=N` (the tenant's share of the GPU
in the fair queue, default 1; every line of a tenant gives the same weight or none). Blank lines and
lines starting with `#` are ignored. A tenant may have several keys (rotation: add the new key, move the
clients, remove the old one).

Tokens are held only as SHA-256 digests and a presented token is compared with every digest with
`hmac.compare_digest` (no early exit), so the time taken says nothing about which key came close. The file
is reread when its contents change (a Kubernetes Secret mounted as a file is replaced in place): a good
file takes effect at once, a bad one keeps the keys in force and logs one error naming the line. No
message here ever quotes a token.

Nothing here knows HTTP or gRPC: the protocols pass the `Authorization` value (`Bearer TOKEN`) they got.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: A tenant's name: it appears in logs, metric labels and Redis keys, so it is short and plain.
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: A plain token: printable ASCII without spaces, long enough not to be guessed.
TOKEN = re.compile(r"^[\x21-\x7e]{16,512}$")
MIN_TOKEN = 16
HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
WEIGHT = re.compile(r"^weight=([0-9]+(?:\.[0-9]+)?)$")
MAX_WEIGHT = 1000.0
#: How often the file is looked at for changes (seconds).
POLL_S = 1.0
BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([\x21-\x7e]+) *$")


@dataclass(frozen=True)
class Tenant:
    """A configured caller: its name and its weight in the fair queue."""

    name: str
    weight: float = 1.0


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and the line (never a token)."""


@dataclass(frozen=True)
class Keys:
    """The keys of one reading of the file: (digest, tenant) pairs and the tenants by name."""

    entries: tuple[tuple[bytes, Tenant], ...]
    tenants: dict[str, Tenant]


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_keys(text: str, source: str) -> Keys:
    """The keys a file's text holds; KeysFileError naming `source` and the line of the first problem."""
    entries: list[tuple[bytes, int, str]] = []  # (digest, line, tenant)
    weights: dict[str, tuple[float | None, int]] = {}  # tenant -> (weight given, line of it)
    seen: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        fields = line.split()
        if len(fields) not in (2, 3):
            raise KeysFileError(f"{where}: expected `TENANT TOKEN` or `TENANT sha256:HEX`, optionally "
                                f"followed by `weight=N`; found {len(fields)} fields")
        name, secret = fields[0], fields[1]
        if not TENANT_NAME.match(name):
            raise KeysFileError(f"{where}: tenant name must be 1-63 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit")
        hashed = HASHED.match(secret)
        if hashed is not None:
            key = bytes.fromhex(hashed.group(1))
        elif secret.lower().startswith("sha256:"):
            raise KeysFileError(f"{where}: sha256: must be followed by 64 hexadecimal digits")
        elif not TOKEN.match(secret):
            raise KeysFileError(f"{where}: the token must be {MIN_TOKEN} to 512 printable ASCII characters "
                                "without spaces (or sha256:HEX)")
        else:
            key = digest(secret)
        weight: float | None = None
        if len(fields) == 3:
            m = WEIGHT.match(fields[2])
            weight = float(m.group(1)) if m is not None else math.nan
            if not 0 < weight <= MAX_WEIGHT:  # nan fails too
                raise KeysFileError(f"{where}: the third field must be weight=N, a number above 0 and at "
                                    f"most {MAX_WEIGHT:g}")
        if key in seen:
            raise KeysFileError(f"{where}: the same key as line {seen[key]}")
        seen[key] = number
        given = weights.get(name)
        if weight is not None and given is not None and given[0] is not None and given[0] != weight:
            raise KeysFileError(f"{where}: tenant {name} was given weight={given[0]:g} on line {given[1]}")
        if given is None or given[0] is None:
            weights[name] = (weight, number)
        entries.append((key, number, name))
    if not entries:
        raise KeysFileError(f"{source}: no keys (every line is blank or a comment); every request would "
                            "be refused")
    tenants = {name: Tenant(name, w if w is not None else 1.0) for name, (w, _) in weights.items()}
    return Keys(tuple((key, tenants[name]) for key, _, name in entries), tenants)


class ApiKeys:
    """The keys in force, from a file reread when it changes (see the module docstring)."""

    def __init__(self, path: str | Path, keys: Keys, text_hash: bytes) -> None:
        self.path = Path(path)
        self._keys = keys
        self._hash = text_hash
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0  # good rereads since start
        self.failures = 0  # bad rereads since start (the keys in force were kept)
        self.file_ok = True  # the file as it is now is the one in force (False: a bad edit is pending)

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        """Read the file at start; KeysFileError (naming the line) when it cannot be used."""
        text = _read(Path(path))
        return cls(path, parse_keys(text, str(path)), hashlib.sha256(text.encode()).digest())

    # ---- who is calling ---------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant an `Authorization: Bearer TOKEN` value names; None when it names none."""
        if not authorization:
            return None
        m = BEARER.match(authorization)
        if m is None:
            return None
        presented = digest(m.group(1))
        found: Tenant | None = None
        for key, tenant in self._keys.entries:  # every key compared: no early exit
            if hmac.compare_digest(presented, key):
                found = tenant
        return found

    def tenant(self, name: str | None) -> Tenant | None:
        return self._keys.tenants.get(name) if name is not None else None

    def weight(self, name: str | None) -> float:
        tenant = self.tenant(name)
        return tenant.weight if tenant is not None else 1.0

    @property
    def names(self) -> list[str]:
        return sorted(self._keys.tenants)

    # ---- rereading --------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Reread the file if its contents changed; True when new keys took effect. A file that cannot be
        read or used keeps the keys in force and logs one error naming the line (once per bad content)."""
        try:
            text = _read(self.path)
        except KeysFileError as exc:
            if self._hash != b"unreadable":
                self._hash = b"unreadable"
                self.failures += 1
                self.file_ok = False
                log.error("API keys not reloaded, the keys in force are kept: %s", exc)
            return False
        text_hash = hashlib.sha256(text.encode()).digest()
        if text_hash == self._hash:
            return False
        self._hash = text_hash
        try:
            keys = parse_keys(text, str(self.path))
        except KeysFileError as exc:
            self.failures += 1
            self.file_ok = False
            log.error("API keys not reloaded, the keys in force are kept: %s", exc)
            return False
        self._keys = keys
        self.reloads += 1
        self.file_ok = True
        log.info("API keys reloaded from %s: %d key(s) of %d tenant(s)", self.path, len(keys.entries),
                 len(keys.tenants))
        return True

    def start(self, poll_s: float = POLL_S) -> None:
        """Look at the file every `poll_s` seconds on a daemon thread."""
        if self._thread is not None:
            return

        def watch() -> None:
            while not self._stop.wait(poll_s):
                try:
                    self.reload()
                except Exception:  # never let the watcher die: the keys in force stay
                    log.exception("API keys: rereading the file failed")

        self._thread = threading.Thread(target=watch, name="kandinsky-api-keys", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{path}: cannot be read ({type(exc).__name__})") from None
