"""The examples run as subprocesses against real Redis, a real rollout worker (in-process, over real
PRM and sandbox servers) and the real services, the way their docstrings say to run them."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import redis

from services.client import adapters
from services.client.sdk import PsgpoRun
from services.common import keys
from services.common.streams import backlog
from services.common.weights import PolicyFollower, sha256_file
from tests.client.conftest import ASSERTS, PROMPT, SAMPLING, Services, run_rollout

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PSGPO_")}
    return {**base, **extra}


def run_trainer_example(
    script: str, run: str, redis_url: str, services: Services, backend, tmp: Path, weights: Path
) -> subprocess.CompletedProcess[str]:
    """Starts the example, serves its 2 tasks x 2 samples with a real worker, waits for it."""
    args = [sys.executable, str(EXAMPLES / script), "--redis", redis_url, "--run", run, "--tasks", "2",
            "--n", "2", "--max-new-tokens", "8", "--timeout", "60", "--weights", str(weights),
            "--store", str(tmp / "store")]  # fmt: skip
    process = subprocess.Popen(
        args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def alive() -> bool:
        return process.poll() is None

    try:
        done = run_rollout(redis_url, run, services, backend, tmp, n_tasks=2, alive=alive)
        stdout, stderr = process.communicate(timeout=60)
        assert done == 2, f"the worker did {done} of 2 tasks; the example said:\n{stdout}{stderr}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def check_trainer_outcome(
    r: redis.Redis, run: str, done: subprocess.CompletedProcess[str], tmp: Path
) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert "enqueued 2 tasks x 2 samples" in done.stdout
    assert "consumed 4 trajectories" in done.stdout
    assert "published policy v1" in done.stdout
    k = keys.run_keys(run)
    assert r.scard(k.trajectories_acked) == 4
    assert backlog(r, k.trajectories, keys.TRAJECTORIES_GROUP).unconsumed == 0
    update = PolicyFollower(r, run, tmp / "follower").update()  # a worker's fetch + checksum check
    assert update is not None and update.policy.version == 1
    assert update.path.parent == tmp / "store" and sha256_file(update.path) == update.policy.sha256


def check_a_worker_swaps_to_it(
    redis_url: str, run: str, services: Services, tiny_models: Path, tmp: Path
) -> None:
    """A fresh rollout worker (policy v0) hot-swaps to the published version: its trajectory says v1."""
    from services.rollout.backend_hf import HfBackend

    backend = HfBackend(tiny_models / "policy", max_batch_sequences=4)
    try:
        with PsgpoRun(redis_url, run) as sdk:
            sdk.enqueue(PROMPT, ASSERTS, 1, sampling=SAMPLING, task_id="after-publish")
            assert run_rollout(redis_url, run, services, backend, tmp, n_tasks=1) == 1
            (batch,) = sdk.trajectories(consumer="checker", max_items=1, idle_timeout_s=10)
            with batch:
                (trajectory,) = batch
                assert trajectory.task_id == "after-publish" and not trajectory.failures
                assert trajectory.policy_version == 1 and backend.version == 1
    finally:
        backend.close()


def test_external_trainer_uses_only_redis_and_the_protos() -> None:
    tree = ast.parse((EXAMPLES / "external_trainer.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    third_party = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names}
    assert third_party == {"redis", "psgpo.v1.rollout_pb2", "psgpo.v1.sandbox_pb2", "psgpo.v1.weights_pb2"}


def test_external_trainer_example(
    r: redis.Redis, redis_server, services: Services, backend, tiny_models: Path, tmp_path: Path
) -> None:
    weights = tiny_models / "policy" / "model.safetensors"
    done = run_trainer_example(
        "external_trainer.py", "ex-raw", redis_server.url, services, backend, tmp_path, weights
    )
    check_trainer_outcome(r, "ex-raw", done, tmp_path)


def test_sdk_trainer_example(
    r: redis.Redis, redis_server, services: Services, backend, tiny_models: Path, tmp_path: Path
) -> None:
    weights = tiny_models / "policy" / "model.safetensors"
    done = run_trainer_example(
        "sdk_trainer.py", "ex-sdk", redis_server.url, services, backend, tmp_path, weights
    )
    check_trainer_outcome(r, "ex-sdk", done, tmp_path)


def test_verl_reward_example(services: Services) -> None:
    script = EXAMPLES / "verl_reward.py"
    urls = {
        "PSGPO_SANDBOX_URL": services.sandbox_url,
        "PSGPO_PRM_URL": services.prm_url,
        "PSGPO_PRM_WEIGHT": "0.1",
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env(**urls), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    passing, failing = done.stdout.splitlines()
    assert passing.startswith("passing: {") and "'acc': 1.0" in passing and "'prm_score'" in passing
    assert failing.startswith("failing: {") and "'acc': 0.0" in failing
    # verl loads the file by path (verl.utils.import_utils.load_extern_object) and takes `compute_score`
    spec = importlib.util.spec_from_file_location("custom_module", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.compute_score is adapters.compute_score
    assert module.compute_score_batch is adapters.compute_score_batch


def test_trl_reward_example(services: Services) -> None:
    args = [sys.executable, str(EXAMPLES / "trl_reward.py"), "--sandbox-url", services.sandbox_url,
            "--prm-url", services.prm_url]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "text format:" in done.stdout and "'psgpo/pass_rate': 0.5" in done.stdout
    assert "chat format:" in done.stdout
