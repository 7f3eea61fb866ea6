"""A real PRM server (HTTP + gRPC on free ports, same event loop) over the tiny PRM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.runner import Running, start_in_thread
from services.prm.config import PrmSettings
from services.prm.server import make_factory


def start_prm(model: Path, **overrides) -> Running:
    settings = PrmSettings(model=model, http_port=0, grpc_port=0, **overrides)
    return start_in_thread(make_factory(settings))


@pytest.fixture(scope="module")
def prm_server(tiny_models: Path) -> Iterator[Running]:
    running = start_prm(tiny_models / "prm")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http_url(prm_server: Running) -> str:
    return f"http://127.0.0.1:{prm_server.http_port}"


@pytest.fixture(scope="module")
def grpc_target(prm_server: Running) -> str:
    return f"127.0.0.1:{prm_server.grpc_port}"
