"""Where Redis is and how to reach it: `--redis_url` (`redis://` or `rediss://`, the database index as its
path), the password from the URL, a file (`--redis_password_file`, a mounted Secret) or the environment
(`REDIS_PASSWORD`), and clients with short timeouts, so that an unreachable Redis is an error within
about a second, never a hang.

The password is never logged: `RedisTarget.redacted` is the URL to show (`redis://:***@host:6379/0`).
The first password found wins, in this order: the file, the environment, the URL (a password in the
URL is visible in the process list, so the other two are preferred).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio
from redis.backoff import NoBackoff

PASSWORD_ENV = "REDIS_PASSWORD"
#: Seconds to connect and for any one command: an unreachable Redis fails a request within ~2 s.
TIMEOUT_S = 1.0
DEFAULT_PORT = 6379


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `--redis_url`: host, port, database, TLS, user; the password kept out of `repr`."""

    host: str
    port: int
    db: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_from: str = "none"  # file, env, url or none: for the start-up log line

    @property
    def redacted(self) -> str:
        """The URL to show: the password replaced by `***`."""
        scheme = "rediss" if self.tls else "redis"
        user = quote(self.username or "", safe="")
        auth = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}"

    def client_kwargs(self, timeout: float | None = TIMEOUT_S) -> dict[str, Any]:
        # One immediate retry (a pooled connection that went stale when Redis restarted), no backoff:
        # redis-py's default backoff would make an unreachable Redis cost seconds per call.
        return {"host": self.host, "port": self.port, "db": self.db, "username": self.username,
                "password": self.password, "ssl": self.tls, "socket_timeout": timeout,
                "socket_connect_timeout": timeout, "health_check_interval": 30}

    def client(self, timeout: float | None = TIMEOUT_S) -> redis.Redis:
        """A blocking client (the worker's thread)."""
        return redis.Redis(**self.client_kwargs(timeout), retry=redis.retry.Retry(NoBackoff(), 1))

    def async_client(self, timeout: float | None = TIMEOUT_S) -> redis.asyncio.Redis:
        """An asyncio client (the event loop's side)."""
        return redis.asyncio.Redis(**self.client_kwargs(timeout),
                                   retry=redis.asyncio.retry.Retry(NoBackoff(), 1))


def resolve(url: str, password_file: str | None = None,
            environ: Mapping[str, str] = os.environ) -> RedisTarget:
    """Parse `--redis_url` and find the password; ValueError naming the flag when anything is wrong
    (the message never contains a password)."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("--redis_url: not a URL (expected redis://host:6379/0)") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"--redis_url: scheme {parts.scheme or '(none)'!r} is not redis:// or rediss://")
    if not parts.hostname:
        raise ValueError("--redis_url: no host (expected redis://host:6379/0)")
    if parts.query or parts.fragment:
        raise ValueError("--redis_url: options after ? or # are not taken; use the flags")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and int(path) < 1 << 16):
        raise ValueError(f"--redis_url: the path must be a database index (0, 1, ...), not {path!r}")
    password, source = None, "none"
    if password_file:
        try:
            password, source = Path(password_file).read_text(encoding="utf-8").strip(), "file"
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--redis_password_file: cannot read {password_file} "
                             f"({type(exc).__name__})") from None
        if not password:
            raise ValueError(f"--redis_password_file: {password_file} is empty")
    elif environ.get(PASSWORD_ENV):
        password, source = environ[PASSWORD_ENV], "env"
    elif parts.password is not None:
        password, source = unquote(parts.password), "url"
    username = unquote(parts.username) if parts.username else None
    return RedisTarget(parts.hostname, port, int(path or 0), parts.scheme == "rediss", username,
                       password, source)
