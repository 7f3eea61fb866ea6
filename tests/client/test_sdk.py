"""The SDK against real Redis: a round trip through a real rollout worker with real PRM and sandbox
servers, the ack semantics, staleness, and weight publishing."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from psgpo.v1 import rollout_pb2, sandbox_pb2
from services.client.sdk import PsgpoRun, TrajectoryBatch, WeightsError
from services.common import keys
from services.common.streams import add_trajectory
from services.common.weights import PolicyFollower
from services.sandbox.model import AssertTests, CallCase, CallTests
from tests.client.conftest import ASSERTS, PROMPT, SAMPLING, Services, run_rollout

RUN = "sdk-test"


def trajectory(task_id: str, index: int = 0, version: int = 0) -> rollout_pb2.Trajectory:
    return rollout_pb2.Trajectory(
        trajectory_id=f"{task_id}:{index}", task_id=task_id, sample_index=index, policy_version=version
    )


def ids(batch: TrajectoryBatch) -> list[str]:
    return [t.trajectory_id for t in batch]


def test_round_trip_through_a_real_worker(
    r: redis.Redis, redis_server, services: Services, backend, tmp_path: Path
) -> None:
    with PsgpoRun(redis_server.url, RUN) as run:
        task_ids = [
            run.enqueue(PROMPT, AssertTests(ASSERTS), 2, sampling=SAMPLING, task_id="t0"),
            run.enqueue(
                PROMPT, {"test_list": ASSERTS.splitlines()}, 2, sampling=SAMPLING, metadata={"k": "v"}
            ),
        ]
        assert task_ids[0] == "t0" and len(task_ids[1]) == 32
        assert run.tasks_backlog().unconsumed == 2
        assert run_rollout(redis_server.url, RUN, services, backend, tmp_path, n_tasks=2) == 2
        assert run.tasks_backlog().unconsumed == 0
        assert run.backlog().unconsumed == 4

        got: list[rollout_pb2.Trajectory] = []
        for batch in run.trajectories(consumer="trainer-0", batch=3, max_items=4, idle_timeout_s=30):
            assert isinstance(batch, TrajectoryBatch) and 1 <= len(batch) <= 3
            got += batch.trajectories
            assert run.backlog().pending == len(batch)  # delivered, not acknowledged yet
            assert batch.ack() == len(batch) and batch.acked
            assert batch.ack() == 0  # a second ack is a no-op
        assert sorted(t.trajectory_id for t in got) == sorted(f"{t}:{i}" for t in task_ids for i in range(2))
        for t in got:
            assert not t.failures, t.failures
            assert t.verdict.status == sandbox_pb2.RUN_STATUS_PASSED and t.verdict.tests_total == 2
            assert t.has_prm_scores and len(t.prm_scores) == len(t.lines) == 1
            assert len(t.logprobs) == len(t.response_token_ids) > 0
            assert all(math.isfinite(x) for x in t.logprobs)
        assert {t.metadata.get("k") for t in got if t.task_id == task_ids[1]} == {"v"}
        assert run.backlog().unconsumed == 0
        assert list(run.trajectories(block_ms=100, idle_timeout_s=0.3)) == []
        assert run.stats.enqueued == 2 and run.stats.yielded == run.stats.acked == 4


def test_unacknowledged_batches_come_back_to_the_same_consumer(r: redis.Redis, redis_server) -> None:
    for i in range(3):
        add_trajectory(r, RUN, trajectory(f"u{i}"))
    with PsgpoRun(redis_server.url, RUN) as first:
        (batch,) = first.trajectories(consumer="trainer-a", batch=10, max_items=3)
        assert ids(batch) == ["u0:0", "u1:0", "u2:0"] and batch.redelivered == 0
        # not acked: the trainer "dies" here
    with PsgpoRun(redis_server.url, RUN) as other:  # another consumer name does not get them (not idle yet)
        assert list(other.trajectories(consumer="trainer-b", block_ms=100, idle_timeout_s=0.3)) == []
    with PsgpoRun(redis_server.url, RUN) as again:  # the same name after a restart: its pending ones first
        (batch,) = again.trajectories(consumer="trainer-a", batch=10, max_items=3)
        assert ids(batch) == ["u0:0", "u1:0", "u2:0"] and batch.redelivered == 3
        with pytest.raises(RuntimeError, match="update failed"), batch:
            raise RuntimeError("update failed")  # an exception in `with batch:` leaves it pending
        assert not batch.acked
        (batch,) = again.trajectories(consumer="trainer-a", batch=10, max_items=3)
        with batch:  # a clean exit acknowledges
            assert ids(batch) == ["u0:0", "u1:0", "u2:0"]
        assert batch.acked and again.backlog().unconsumed == 0
        # a redelivered copy of an acknowledged id (a producer retry) is skipped, not trained on twice
        duplicate = trajectory("u1")
        duplicate.schema_version = keys.SCHEMA_VERSION
        r.xadd(keys.run_keys(RUN).trajectories, {"pb": duplicate.SerializeToString()})
        add_trajectory(r, RUN, trajectory("u3"))
        assert [
            ids(b) for b in again.trajectories(consumer="trainer-a", block_ms=100, idle_timeout_s=0.5)
        ] == [["u3:0"]]


def test_idle_pending_trajectories_are_reclaimed_by_another_consumer(r: redis.Redis, redis_server) -> None:
    add_trajectory(r, RUN, trajectory("c0"))
    with PsgpoRun(redis_server.url, RUN, claim_idle_ms=200) as run:
        (batch,) = run.trajectories(consumer="dead-trainer", max_items=1)
        assert ids(batch) == ["c0:0"]
    time.sleep(0.3)  # idle past claim_idle_ms
    with PsgpoRun(redis_server.url, RUN, claim_idle_ms=200) as run:
        (batch,) = run.trajectories(consumer="live-trainer", block_ms=100, max_items=1, idle_timeout_s=5)
        assert ids(batch) == ["c0:0"] and batch.redelivered == 1
        batch.ack()


def test_publish_weights_moves_the_policy_version(r: redis.Redis, redis_server, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="weights are tensors: install the ml extra")
    from safetensors.torch import save_file

    store = tmp_path / "store"
    with PsgpoRun(redis_server.url, RUN) as run:
        assert run.policy_version() == 0 and run.policy() is None
        state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
        v1 = run.publish_weights(1, state, store)
        assert run.policy_version() == 1 and run.policy() == v1
        assert v1.uri == (store / "policy-v000000000001.safetensors").resolve().as_uri()
        update = PolicyFollower(r, RUN, tmp_path / "cache").update()  # what a rollout worker does
        assert update is not None and update.policy.version == 1
        assert torch.equal(update.state_dict()["w"], state["w"])

        blob = tmp_path / "trained.safetensors"
        save_file({"w": torch.zeros(2, 3)}, str(blob))
        v3 = run.publish_weights(3, blob, store, serve_uri="grpc://127.0.0.1:50099", keep=1)
        assert run.policy_version() == 3 and v3.uri == "grpc://127.0.0.1:50099"
        assert [p.name for p in store.glob("*.safetensors")] == ["policy-v000000000003.safetensors"]
        with pytest.raises(WeightsError, match="current is 3"):
            run.publish_weights(2, blob, store)


def test_max_staleness_drops_old_trajectories(r: redis.Redis, redis_server, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="weights are tensors: install the ml extra")
    with PsgpoRun(redis_server.url, RUN) as run:
        run.publish_weights(3, {"w": torch.zeros(1)}, tmp_path / "store")
        for version in range(4):
            add_trajectory(r, RUN, trajectory(f"s{version}", version=version))
        batches = list(run.trajectories(batch=10, block_ms=100, idle_timeout_s=0.5, max_staleness=1))
        assert [t.policy_version for b in batches for t in b] == [2, 3]
        assert run.stats.stale_dropped == 2
        for b in batches:
            b.ack()
        assert run.backlog().unconsumed == 0  # the stale ones were acknowledged, not left pending


def test_enqueue_builds_the_task_proto(r: redis.Redis, redis_server) -> None:
    k = keys.run_keys(RUN)
    with PsgpoRun(redis_server.url, RUN) as run:
        calls = CallTests("add", (CallCase([1, 2], 3),))
        run.enqueue("def add(a, b):\n", calls, 3, sampling={"temperature": 0.5, "stop": "\n\n"}, task_id="a")
        spec = sandbox_pb2.TestSpec(
            humaneval=sandbox_pb2.HumanEvalTests(test="def check(f): pass", entry_point="f")
        )
        run.enqueue("p", spec, 1, score_with_prm=False, task_id="b")
        ((_, entries),) = r.xread({k.tasks: "0"})
        a, b = (rollout_pb2.Task.FromString(fields[b"pb"]) for _, fields in entries)
        assert a.schema_version == 1 and a.task_id == "a" and a.n == 3 and a.score_with_prm
        assert a.tests.call.fn == "add" and a.tests.call.cases[0].args_json == "[1, 2]"
        assert a.sampling.temperature == 0.5 and list(a.sampling.stop) == ["\n\n"]
        assert b.tests == spec and not b.score_with_prm and not b.HasField("sampling")
        for bad, match in [
            (dict(prompt=" ", tests="assert 1", n=1), "prompt"),
            (dict(prompt="p", tests="assert 1", n=0), "n must be"),
            (dict(prompt="p", tests={"nope": 1}, n=1), "unrecognised mapping"),
            (dict(prompt="p", tests=sandbox_pb2.TestSpec(), n=1), "no test kind"),
            (dict(prompt="p", tests="assert 1", n=1, sampling={"temprature": 1.0}), "temprature"),
        ]:
            with pytest.raises(ValueError, match=match):
                run.enqueue(**bad)
        assert r.xlen(k.tasks) == 2  # nothing half-written


def test_the_client_modules_import_no_model_library() -> None:
    code = (
        "import sys, services.client.sdk, services.client.adapters, services.client.testspec;"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
