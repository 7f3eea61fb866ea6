"""An external trainer that speaks psgpo's Redis protocol (docs/redis.md) with nothing but redis-py
and the generated protos (`psgpo.v1`): no psgpo service code is imported. Copy it into your trainer.

It enqueues a few coding tasks, consumes their scored trajectories with XREADGROUP (its own
unacknowledged ones first, so a restart under the same --consumer resumes), acknowledges them with
XACK + SADD of their ids in one MULTI once the "update" is done, and publishes a weights file as
the next policy version (file copied to --store, sha256, policy hash + event in one transaction).

Run it with Redis, the sandbox, the PRM and at least one rollout worker up for the same run, e.g.

    psgpo serve rollout --policy runs/demo/policy --redis redis://127.0.0.1:6379/0 --run demo ...
    python examples/external_trainer.py --redis redis://127.0.0.1:6379/0 --run demo \\
        --weights runs/demo/policy/model.safetensors --store /shared/psgpo-weights

--weights must be a safetensors file of the full policy state dict; --store a directory the rollout
workers read at the same path. Without --weights nothing is published. Needs: pip install redis
protobuf, and the psgpo.v1 modules (protos/psgpo/v1/*_pb2.py) on the import path.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import sys
import time
import uuid
from pathlib import Path

import redis

from psgpo.v1.rollout_pb2 import SamplingParams, Task, Trajectory
from psgpo.v1.sandbox_pb2 import RUN_STATUS_PASSED, AssertTests, TestSpec
from psgpo.v1.weights_pb2 import PolicyVersion

SCHEMA_VERSION = 1
STOP = ["\ndef ", "\nclass ", "\nif __name__"]  # end a sample after its function
TASKS = [  # (prompt, MBPP-style asserts)
    ("def add(a, b):\n", "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"),
    ("def square(x):\n", "assert square(3) == 9\nassert square(-2) == 4\n"),
    ("def is_even(n):\n", "assert is_even(4)\nassert not is_even(7)\n"),
    ("def last(items):\n", "assert last([1, 2, 3]) == 3\nassert last('ab') == 'b'\n"),
]


class Protocol:
    """The names of one run and the four protocol steps."""

    def __init__(self, r: redis.Redis, run: str, consumer: str):
        self.r, self.consumer = r, consumer
        self.tasks, self.trajectories = f"psgpo:{run}:tasks", f"psgpo:{run}:trajectories"
        self.acked, self.dead = f"psgpo:{run}:trajectories:acked", f"psgpo:{run}:dead"
        self.policy, self.events = f"psgpo:{run}:policy", f"psgpo:{run}:policy:events"
        self.group = "trainer"
        self.read_from = "0"  # own pending entries first (after a restart), then ">" (new ones)
        try:
            r.xgroup_create(self.trajectories, self.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def enqueue(self, task: Task) -> None:
        task.schema_version = SCHEMA_VERSION
        self.r.xadd(self.tasks, {"pb": task.SerializeToString()})

    def reclaim(self, idle_ms: int = 60_000) -> int:
        """Takes over trajectories another consumer of the group (a trainer process that died) left
        unacknowledged for `idle_ms`; they are then read as this consumer's own pending ones."""
        cursor, claimed = "0-0", 0
        for _ in range(1000):  # bounded: 1000 pages of 100
            reply = self.r.xautoclaim(
                self.trajectories, self.group, self.consumer, idle_ms, cursor, count=100
            )
            cursor, claimed = reply[0], claimed + len(reply[1])  # reply: [next cursor, entries, ...]
            if cursor in (b"0-0", "0-0"):
                break
        if claimed:
            self.read_from = "0"
        return claimed

    def read_batch(self, count: int = 32, block_ms: int = 1000) -> list[tuple[bytes, Trajectory]]:
        """Own pending entries first (after a restart or a reclaim), then new ones."""
        history = self.read_from != ">"
        streams = {self.trajectories: self.read_from}
        reply = self.r.xreadgroup(self.group, self.consumer, streams, count, None if history else block_ms)
        entries = reply[0][1] if reply else []
        if history:
            self.read_from = entries[-1][0].decode() if entries else ">"
        batch: list[tuple[bytes, Trajectory]] = []
        seen: set[str] = set()
        for entry_id, fields in entries:
            fields = fields or {}  # a pending entry deleted from the stream has no fields
            try:
                trajectory = Trajectory.FromString(fields[b"pb"])
                if trajectory.schema_version != SCHEMA_VERSION:
                    raise ValueError(f"schema_version {trajectory.schema_version}, expected {SCHEMA_VERSION}")
            except Exception as error:  # poison: keep it for inspection, acknowledge it
                self.dead_letter(entry_id, fields.get(b"pb", b""), str(error) or type(error).__name__)
                continue
            if trajectory.trajectory_id in seen:  # repeated within the batch
                self.r.xack(self.trajectories, self.group, entry_id)
                continue
            seen.add(trajectory.trajectory_id)
            batch.append((entry_id, trajectory))
        if not batch:
            return batch
        already = self.r.smismember(self.acked, [t.trajectory_id for _, t in batch])
        duplicates = [entry_id for (entry_id, _), acked in zip(batch, already, strict=True) if acked]
        if duplicates:  # redelivered copies of trajectories already trained on
            self.r.xack(self.trajectories, self.group, *duplicates)
        return [item for item, acked in zip(batch, already, strict=True) if not acked]

    def dead_letter(self, entry_id: bytes, pb: bytes, reason: str) -> None:
        dead = {"pb": pb, "reason": reason, "stream": self.trajectories, "id": entry_id}
        dead |= {"group": self.group, "consumer": self.consumer, "deliveries": 1}
        self.r.pipeline(transaction=True).xadd(self.dead, dead).xack(
            self.trajectories, self.group, entry_id
        ).execute()

    def ack(self, batch: list[tuple[bytes, Trajectory]]) -> None:
        """Only after the update that used `batch` is durable."""
        if batch:
            pipe = self.r.pipeline(transaction=True)
            pipe.xack(self.trajectories, self.group, *[entry_id for entry_id, _ in batch])
            pipe.sadd(self.acked, *[t.trajectory_id for _, t in batch])
            pipe.execute()

    def publish_weights(self, weights: Path, store: Path) -> PolicyVersion:
        """The next version. The blob is named by its content, so a file is never rewritten with
        other bytes; the hash and the event are set in one transaction that refuses a version
        another publisher took meanwhile (WatchError)."""
        data = weights.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        store.mkdir(parents=True, exist_ok=True)
        blob = store / f"policy-{digest[:16]}.safetensors"
        if not blob.exists():
            tmp = blob.with_name(f".{blob.name}.tmp")
            shutil.copyfile(weights, tmp)
            tmp.replace(blob)
        with self.r.pipeline() as pipe:
            pipe.watch(self.policy)
            version = int(pipe.hget(self.policy, "version") or 0) + 1
            policy = PolicyVersion(
                version=version,
                uri=blob.resolve().as_uri(),
                sha256=digest,
                size=len(data),
                format="safetensors-full",
            )
            fields = {
                "version": version,
                "uri": policy.uri,
                "sha256": digest,
                "size": len(data),
                "format": policy.format,
            }
            pipe.multi()
            pipe.hset(self.policy, mapping=fields)
            pipe.publish(self.events, policy.SerializeToString())
            pipe.execute()
        return policy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--run", default="demo")
    parser.add_argument("--consumer", default="external-trainer-0", help="stable name per trainer process")
    parser.add_argument("--tasks", type=int, default=4, help="tasks to enqueue")
    parser.add_argument("--n", type=int, default=4, help="samples per task")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the trajectories")
    parser.add_argument("--weights", type=Path, default=None, help="safetensors file to publish afterwards")
    parser.add_argument("--store", type=Path, default=Path("runs/weights"), help="where workers read weights")
    args = parser.parse_args()

    r = redis.Redis.from_url(args.redis, socket_timeout=30)
    protocol = Protocol(r, args.run, args.consumer)
    protocol.reclaim()  # what trainer processes that died left behind
    prefix = uuid.uuid4().hex[:8]  # task ids must be unique within a run
    expected = set()
    for i in range(args.tasks):
        prompt, asserts = TASKS[i % len(TASKS)]
        sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, stop=STOP)
        tests = TestSpec(assert_tests=AssertTests(code=asserts))
        task = Task(
            task_id=f"{prefix}-{i}",
            prompt=prompt,
            tests=tests,
            n=args.n,
            sampling=sampling,
            score_with_prm=True,
        )
        protocol.enqueue(task)
        expected |= {f"{task.task_id}:{j}" for j in range(args.n)}
    print(f"enqueued {args.tasks} tasks x {args.n} samples on psgpo:{args.run}:tasks", flush=True)

    mine: list[Trajectory] = []
    deadline = time.monotonic() + args.timeout
    while expected and time.monotonic() < deadline:
        batch = protocol.read_batch()
        # ... your PPO/GRPO update on `batch` goes here, then save a checkpoint ...
        protocol.ack(batch)  # acknowledge only once that update is durable
        for _, trajectory in batch:
            if trajectory.trajectory_id in expected:
                expected.discard(trajectory.trajectory_id)
                mine.append(trajectory)
    if expected:
        print(f"timed out: {len(expected)} trajectories missing", file=sys.stderr)
        return 1
    passed = sum(t.verdict.status == RUN_STATUS_PASSED for t in mine)
    failures = sum(len(t.failures) > 0 for t in mine)
    scored = [[s for s in t.prm_scores if not math.isnan(s)] for t in mine]  # NaN: neutral line
    prm = [min(scores) for scores in scored if scores]
    prm_text = f", mean PRM min-line score {sum(prm) / len(prm):.3f}" if prm else ""
    print(f"consumed {len(mine)} trajectories: {passed} passed, {failures} with failures{prm_text}")
    if args.weights is not None:
        policy = protocol.publish_weights(args.weights, args.store)
        print(f"published policy v{policy.version} sha256 {policy.sha256[:12]} at {policy.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
