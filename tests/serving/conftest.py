"""Fixtures of the modules that run many replicas on one Redis (test_replicas.py, test_redis_jobs.py,
test_redis_job_retention.py): each module gets its own `redis-server` and, when it asks, its own `api`
replica (no weights) on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import RedisServer, replica, replica_flags


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(tiny_model_dir: Path, redis_srv: RedisServer) -> Iterator[dict[str, Any]]:
    with replica(tiny_model_dir, *replica_flags(redis_srv, "api", "api-0")) as srv:
        yield srv
