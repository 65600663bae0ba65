"""`--redis_url` and the Redis password: parsed with errors naming the flag, the password from a file, the
environment or the URL (in that order), never shown; clients that reach a real `redis-server` with it and
fail fast (not hang) when Redis is gone."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from app.serving.queue.redis_conn import PASSWORD_ENV, resolve
from tests.support import ROOT, RedisServer

SECRET = "s3cr#t:p@ss/word"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"), password=SECRET).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize(("url", "field"), [
    ("http://localhost:6379/0", "scheme 'http'"),
    ("localhost:6379", "scheme"),
    ("redis:///0", "no host"),
    ("redis://localhost:6379/cache", "database index"),
    ("redis://localhost:6379/0?ssl_cert_reqs=none", "options"),
    ("redis://localhost:99999/0", "not a URL"),
])
def test_a_bad_url_is_refused_naming_the_flag(url: str, field: str) -> None:
    with pytest.raises(ValueError) as err:
        resolve(url, environ={})
    assert str(err.value).startswith("--redis_url: ") and field in str(err.value)


def test_the_password_comes_from_the_file_then_the_environment_then_the_url(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text("from-file\n")
    url = "redis://:from-url@redis.kandinsky.svc:6380/2"
    env = {PASSWORD_ENV: "from-env"}
    assert resolve(url, str(secret_file), env).password == "from-file"
    assert resolve(url, None, env).password == "from-env"
    target = resolve(url, None, {})
    assert (target.password, target.password_from) == ("from-url", "url")
    assert (target.host, target.port, target.db, target.tls) == ("redis.kandinsky.svc", 6380, 2, False)
    assert resolve("rediss://redis:6379", environ={}).tls and resolve("redis://redis", environ={}).db == 0
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="--redis_password_file: .* is empty"):
        resolve(url, str(tmp_path / "empty"), env)
    with pytest.raises(ValueError, match="--redis_password_file: cannot read"):
        resolve(url, str(tmp_path / "missing"), env)


def test_the_password_is_never_shown() -> None:
    target = resolve("redis://worker:" + "s3cr%23t%3Ap%40ss%2Fword" + "@redis:6379/1", environ={})
    assert target.password == SECRET and target.username == "worker"
    assert target.redacted == "redis://worker:***@redis:6379/1"
    assert SECRET not in repr(target) and "s3cr" not in repr(target)
    assert resolve("redis://redis:6379/1", environ={}).redacted == "redis://redis:6379/1"


def test_clients_reach_a_real_redis_with_the_password_and_refuse_a_wrong_one(server, tmp_path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET)
    target = resolve(server.url, str(secret_file), environ={})
    assert target.client().ping() is True

    async def ping() -> bool:
        client = target.async_client()
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    assert asyncio.run(ping()) is True
    with pytest.raises(redis.AuthenticationError):
        resolve(server.url, environ={PASSWORD_ENV: "wrong"}).client().ping()


def test_an_unreachable_redis_fails_within_about_a_second(tmp_path) -> None:
    gone = RedisServer(tmp_path / "gone").start()
    target = resolve(gone.url, environ={})
    client = target.client()
    assert client.ping() is True
    gone.kill()
    t0 = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert time.monotonic() - t0 < 2.0  # SPEC section 11: a 503 within 2 s, never a hang


def test_a_redis_that_stops_answering_is_a_timeout_not_a_hang(tmp_path) -> None:
    frozen = RedisServer(tmp_path / "frozen").start()
    client = resolve(frozen.url, environ={}).client()
    assert client.ping() is True
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)  # connected, but nothing answers (a partition, a long pause)
    try:
        t0 = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - t0 < 2.5  # the 1 s socket timeout, retried once
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
        frozen.kill()


@pytest.mark.parametrize(("flags", "needle"), [
    (["--role", "api"], "--role api: needs --redis_url"),
    (["--role", "worker"], "--role worker: needs --redis_url"),
    (["--redis_password_file", "/nonexistent"], "--redis_password_file: given without --redis_url"),
    (["--redis_url", "http://redis:6379/0"], "--redis_url: scheme 'http'"),
    (["--redis_url", "redis://redis/0", "--redis_password_file", "/nonexistent"], "cannot read"),
    (["--redis_url", "redis://redis/0", "--job_lease", "0"], "--job_lease: must be > 0"),
    (["--redis_url", "redis://redis/0", "--max_deliveries", "0"], "--max_deliveries: must be > 0"),
])
def test_bad_redis_flags_are_refused_naming_the_flag(tiny_model_dir, flags, needle):
    from app.__main__ import SettingsError, build_parser, settings_from_args

    args = build_parser().parse_args(["--model_dir", str(tiny_model_dir), "--device", "cpu", *flags])
    with pytest.raises(SettingsError, match=re.escape(needle)):
        settings_from_args(args)


def test_a_bad_redis_url_exits_2_with_one_line_that_never_shows_the_password(tiny_model_dir):
    url = "redis://:" + SECRET.replace("#", "%23") + "@redis:6379/db"
    proc = subprocess.run([sys.executable, "-m", "app", "--model_dir", str(tiny_model_dir), "--device", "cpu",
                           "--redis_url", url], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--redis_url: the path must be a database index" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "s3cr" not in proc.stderr
