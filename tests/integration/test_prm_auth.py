"""Bearer-token auth on HTTP and gRPC (off by default, on when a token is set)."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest

from services.prm.client import PrmError, PrmGrpcClient, PrmHttpClient
from tests.integration.conftest import start_prm

TOKEN = "s3cret-token-value"


def test_auth_required_when_token_set(tiny_models: Path, tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    running = start_prm(tiny_models / "prm", auth_token_file=token_file)
    try:
        url = f"http://127.0.0.1:{running.http_port}"
        body = {"items": [{"prompt": "", "response": "x = 1"}]}
        assert httpx.post(f"{url}/v1/score", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{url}/v1/score", json=body, headers=wrong).status_code == 401
        assert httpx.post(f"{url}/get_reward", json={"query": ["x"]}).status_code == 401
        ok = httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open
        assert TOKEN not in httpx.get(f"{url}/metrics").text
        with PrmHttpClient(url, token=TOKEN) as client:
            assert client.score([("", "x = 1")])[0].lines[0].score is not None
        target = f"127.0.0.1:{running.grpc_port}"
        with PrmGrpcClient(target, retries=0) as anon, pytest.raises(PrmError) as err:
            anon.score([("", "x = 1")])
        assert err.value.status == grpc.StatusCode.UNAUTHENTICATED.name
        with PrmGrpcClient(target, token=TOKEN) as client:
            assert len(client.score([("", "x = 1")])) == 1
    finally:
        running.stop()
