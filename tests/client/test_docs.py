"""docs/clients.md matches the code: every Python snippet compiles and imports what exists, and the
adapter snippets run against the real services with the results their comments show."""

from __future__ import annotations

import ast
import importlib
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from services.client import adapters
from services.client.sdk import PsgpoRun
from services.client.testspec import parse_tests
from services.sandbox.model import AssertTests
from tests.client.conftest import Services, run_rollout

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), re.S | re.M)


def snippet(needle: str) -> str:
    (block,) = [b for b in BLOCKS if needle in b]
    return block


def run(code: str, services: Services) -> dict[str, Any]:
    code = code.replace("http://127.0.0.1:8002", services.sandbox_url).replace(
        "http://127.0.0.1:8001", services.prm_url
    )
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def test_every_snippet_compiles_and_imports_what_exists() -> None:
    assert len(BLOCKS) >= 7
    for block in BLOCKS:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("services"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module}.{alias.name} in docs/clients.md"


def test_verl_snippets(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in adapters.ENV.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PSGPO_SANDBOX_URL", services.sandbox_url)
    row = run(snippet("row = {"), services)["row"]
    assert parse_tests(row["reward_model"]["ground_truth"]) == AssertTests("assert add(1, 2) == 3\n")
    code = snippet("result = compute_score(")
    shown = ast.literal_eval(re.search(r"^# (\{.*\})$", code, re.M).group(1))  # type: ignore[union-attr]
    assert run(code, services)["result"] == shown
    monkeypatch.setenv("PSGPO_PRM_URL", services.prm_url)
    result = run(code, services)["result"]
    assert set(result) == set(shown) | {"prm_score", "prm_lines"}


def test_trl_snippet(services: Services) -> None:
    namespace = run(snippet("make_trl_reward("), services)
    good, bad = namespace["rewards"]
    prm_good, prm_bad = good - 1.0, bad - 0.0  # the comment: [1.0 + 0.1 * prm, 0.0 + 0.1 * prm]
    assert abs(prm_good) <= 0.1 and abs(prm_bad) <= 0.1 and good > bad
    namespace["reward"].close()


def test_openrlhf_snippet(services: Services, capsys: pytest.CaptureFixture[str]) -> None:
    run(snippet("check_openrlhf_reward_url("), services)
    assert "reward for the probe:" in capsys.readouterr().out


def test_sdk_snippets(
    r, redis_server, services: Services, backend, tiny_models: Path, tmp_path: Path
) -> None:
    """The first SDK snippet, served by a real rollout worker; the gRPC weights one on a free port."""
    url = redis_server.url
    code = snippet("task_id = run.enqueue(").replace("redis://127.0.0.1:6379/0", url)
    code = code.replace(
        "checkpoints/step-100/model.safetensors", str(tiny_models / "policy" / "model.safetensors")
    )
    code = code.replace("/shared/psgpo-weights", str(tmp_path / "store"))
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome.update(run(code, services))
        except BaseException as error:  # reported below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert run_rollout(url, "demo", services, backend, tmp_path, n_tasks=1, alive=thread.is_alive) == 1
    thread.join(30)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert outcome["run"].stats.enqueued == 1 and outcome["run"].stats.acked == 4
    with PsgpoRun(url, "demo") as sdk:
        assert sdk.policy_version() == 1 and sdk.backlog().unconsumed == 0

    code = (
        snippet("WeightsServer(")
        .replace("redis://127.0.0.1:6379/0", url)
        .replace("/tmp/psgpo-weights", str(tmp_path / "grpc"))
    )
    code = code.replace('host="0.0.0.0", port=50060', 'host="127.0.0.1", port=0')
    run(code, services)
    with PsgpoRun(url, "demo") as sdk:
        policy = sdk.policy()
    assert policy is not None and policy.version == 2 and policy.uri.startswith("grpc://trainer-0:")
