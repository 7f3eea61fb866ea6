"""Fault injection on a real local stack (`psgpo bench chaos`, `make chaos`; docs/chaos.md).

Each scenario enqueues a fixed set of tasks (task ids x n samples) on its own run, lets rollout workers
(real processes, tiny policy) turn them into scored trajectories through the real sandbox and PRM
services and Redis, injects one fault mid-run, and waits (bounded) until every expected trajectory is
consumed. The consumer is either the real trainer (`psgpo train ppo`, checkpoint every step) or a
`ProtocolConsumer` that follows the trainer's protocol step by step without training.

Accounting, from ground truth: the ids the consumer durably recorded (the trainer: `trained_ids.jsonl`,
which lists exactly the updates its weights contain) against the expected (task_id, sample_index) set
gives `lost` (expected but never trained on, or acknowledged but not trained on) and `duplicated`
(trained on more than once). Policy versions: the published ones must be 1..K, each once; every worker
incarnation must apply strictly increasing published versions (from its log), and every live worker must
end on K; a trajectory carries version 0 or a published one. Recovery time: from the fault to the next
trajectory the consumer accepted.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from psgpo.v1 import rollout_pb2, sandbox_pb2
from services.chaos_accounting import Outcome, check_versions, recovery, table, tally
from services.chaos_stack import Proc, ProtocolConsumer, Stack, WorkerOptions, stop_all
from services.common import keys
from services.common.errors import UserError

# The response is one comment line (stop at "\n"), so every program is valid and passes whatever the
# untrained tiny policy samples: a real "passed" verdict from the sandbox, real PRM line scores.
PROMPT = "def one():\n    return 1\n# "


def make_tasks(count: int, n: int, sleep_s: float = 0.0) -> list[rollout_pb2.Task]:
    """`count` tasks t000.. of `n` samples; `sleep_s` makes each test run last that long."""
    code = (f"import time\ntime.sleep({sleep_s})\n" if sleep_s else "") + "assert one() == 1\n"
    return [
        rollout_pb2.Task(
            task_id=f"t{i:03d}",
            prompt=PROMPT,
            tests=sandbox_pb2.TestSpec(assert_tests=sandbox_pb2.AssertTests(code=code)),
            n=n,
            sampling=rollout_pb2.SamplingParams(temperature=1.0, max_new_tokens=12, seed=i, stop=["\n"]),
            score_with_prm=True,
        )
        for i in range(count)
    ]


def expected_ids(tasks: list[rollout_pb2.Task]) -> set[str]:
    return {f"{t.task_id}:{j}" for t in tasks for j in range(t.n)}


# =====================================================================================================
# Scenarios
# =====================================================================================================


@dataclass
class Context:
    """What a fault injector gets: the stack, the scenario's run and its live rollout workers."""

    stack: Stack
    run: str
    workers: list[Proc]
    options: WorkerOptions
    notes: list[str]
    trainer: Proc | None = None
    restart_trainer: Callable[[], Proc] | None = None
    fault_at: float | None = None  # time.time() of the first blow, set by the injector
    crashes: int = 0

    def mark(self) -> None:
        if self.fault_at is None:
            self.fault_at = time.time()

    def restart_worker(self, victim: Proc, name: str | None = None) -> Proc:
        """A supervisor's restart. Under the same consumer name it reads its own pending tasks first;
        under a new one (a new pod) the victim's tasks wait for XAUTOCLAIM after claim_idle_ms."""
        fresh = self.stack.launch_worker(self.run, name or victim.name, self.options)
        self.workers[self.workers.index(victim)] = fresh
        return fresh


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str
    inject: Callable[[Context], None]
    trainer: bool = False  # the real trainer consumes (else a ProtocolConsumer)
    tasks: int = 10
    samples: int = 2
    workers: int = 2
    sleep_s: float = 0.0  # per test run (the sandbox fault needs runs long enough to be hit)
    prepare: Callable[[Context], None] | None = None  # before the tasks are enqueued


def kill_rollout_worker(ctx: Context, rename: bool = False) -> None:
    """SIGKILL a worker that holds unacknowledged tasks, restart it 1 s later under the same consumer
    name (or, with `rename`, a new one: its tasks then come back by XAUTOCLAIM)."""
    from services.common.streams import connect

    r = connect(ctx.stack.redis_url)
    victim = ctx.workers[0]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # mid-batch: it has tasks delivered and not acknowledged
        holders = {_text(c["name"]): int(c["pending"]) for c in _consumers(r, keys.run_keys(ctx.run).tasks)}
        busy = [w for w in ctx.workers if holders.get(w.name, 0) > 0]
        if busy:
            victim = busy[0]
            break
        time.sleep(0.02)
    holding = _consumer_pending(r, keys.run_keys(ctx.run).tasks, victim.name)
    ctx.mark()
    victim.kill()
    ctx.notes.append(f"killed {victim.name} holding {holding} tasks")
    time.sleep(1.0)
    ctx.restart_worker(victim, f"{victim.name}r" if rename else None)
    r.close()


def kill_renamed(ctx: Context) -> None:
    kill_rollout_worker(ctx, rename=True)


def kill_prm(ctx: Context) -> None:
    """SIGKILL the PRM service, start a new one on the same ports at once (as a supervisor would)."""
    assert ctx.stack.prm is not None
    ctx.mark()
    ctx.stack.prm.kill()
    started = time.monotonic()
    ctx.stack.restart_prm()
    ctx.notes.append(f"PRM back in {time.monotonic() - started:.1f}s")


def kill_sandbox_workers(ctx: Context, kills: int = 2) -> None:
    """SIGKILL a sandbox worker process in the middle of a run (it has a child: the run), twice."""
    import httpx

    for i in range(kills):
        pid, deadline = None, time.monotonic() + 10
        while pid is None and time.monotonic() < deadline:
            pid = ctx.stack.busy_sandbox_worker()
            if pid is None:
                time.sleep(0.01)
        mid_run = pid is not None
        pid = pid if pid is not None else ctx.stack.sandbox_worker_pids()[0]
        ctx.mark()
        os.kill(pid, signal.SIGKILL)
        ctx.notes.append(f"killed sandbox worker pid {pid} ({'mid-run' if mid_run else 'idle'})")
        if i + 1 < kills:
            time.sleep(1.0)
    http = ctx.stack.ports["sandbox"][0]
    deadline = time.monotonic() + 20
    restarts = 0.0
    while time.monotonic() < deadline and restarts < kills:
        # a worker killed while idle is replaced when the pool next hands it a run: send some runs
        probe = {"code": "x = 1\n", "tests": {"kind": "assert", "code": "assert x == 1\n"}}
        httpx.post(f"http://127.0.0.1:{http}/v1/run/batch", json={"requests": [probe] * 2}, timeout=30)
        text = httpx.get(f"http://127.0.0.1:{http}/metrics", timeout=5).text
        restarts = _metric(text, "sandbox_worker_restarts")
        time.sleep(0.2)
    ctx.notes.append(f"sandbox pool restarts {restarts:.0f}, workers {len(ctx.stack.sandbox_worker_pids())}")
    if restarts < kills:
        raise RuntimeError(f"the sandbox pool replaced {restarts:.0f} of {kills} killed workers")


def restart_redis(ctx: Context) -> None:
    """SIGKILL Redis (no shutdown save), 1 s down, restart on the same port and AOF dir (`appendfsync
    always` again); check that every acknowledgement made before the crash survived it."""
    from services.common.streams import connect

    k = keys.run_keys(ctx.run)
    r = connect(ctx.stack.redis_url)
    before = int(r.scard(k.trajectories_acked))
    r.close()
    ctx.mark()
    ctx.stack.kill_redis()
    time.sleep(1.0)
    ctx.stack.start_redis()
    r = connect(ctx.stack.redis_url)
    after = int(r.scard(k.trajectories_acked))
    r.close()
    ctx.notes.append(f"acked set {before} before the crash, {after} after the restart")
    if after < before:
        raise RuntimeError(f"Redis lost acknowledged trajectories: {before} -> {after}")


def fsync_everysec(ctx: Context) -> None:
    """Redis as docker-compose and Kubernetes run it: the AOF written at once, fsynced each second."""
    from services.common.streams import connect

    r = connect(ctx.stack.redis_url)
    r.config_set("appendfsync", "everysec")
    r.close()


def drop_connections(ctx: Context, rounds: int = 3) -> None:
    """CLIENT KILL every normal and pub/sub connection (not the harness's own), `rounds` times."""
    from services.common.streams import connect

    r = connect(ctx.stack.redis_url)
    killed = 0
    ctx.mark()
    for i in range(rounds):
        killed += int(r.client_kill_filter(_type="normal")) + int(r.client_kill_filter(_type="pubsub"))
        if i + 1 < rounds:
            time.sleep(0.7)
    r.close()
    ctx.notes.append(f"{killed} connections killed in {rounds} rounds")


def kill_trainer(ctx: Context) -> None:
    """SIGKILL the trainer right after its second checkpoint, restart it from its checkpoint at once."""
    assert ctx.trainer is not None and ctx.restart_trainer is not None
    ctx.mark()
    ctx.trainer.kill()
    ctx.notes.append("trainer killed after checkpoint step-00000002")
    ctx.trainer = ctx.restart_trainer()


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("rollout-kill", "SIGKILL a rollout worker (restarted)", kill_rollout_worker),
        Scenario("rollout-kill-new-name", "SIGKILL a rollout worker (new consumer name)", kill_renamed),
        Scenario("prm-kill", "SIGKILL the PRM server (restarted)", kill_prm),
        Scenario("sandbox-kill", "SIGKILL sandbox workers mid-run (x2)", kill_sandbox_workers, sleep_s=0.3),
        Scenario("trainer-kill", "SIGKILL the trainer (restarted)", kill_trainer, trainer=True, tasks=12),
        Scenario("redis-restart", "Redis SIGKILL + restart (AOF always)", restart_redis),
        Scenario(
            "redis-restart-everysec",
            "Redis SIGKILL + restart (AOF everysec)",
            restart_redis,
            prepare=fsync_everysec,
        ),
        Scenario(
            "redis-restart-trainer",
            "Redis SIGKILL + restart, real trainer",
            restart_redis,
            trainer=True,
            tasks=12,
        ),
        Scenario("drop-connections", "CLIENT KILL all connections (x3)", drop_connections),
    )
}
QUICK = ("rollout-kill", "redis-restart")


# =====================================================================================================
# Running one scenario
# =====================================================================================================


def run_scenario(stack: Stack, scenario: Scenario, workdir: Path, timeout_s: float = 240.0) -> Outcome:
    """Runs one scenario on `stack` (its own run name and workers); never raises: failures are in
    `Outcome.error`. Its workers and trainer are stopped before it returns."""
    out = Outcome(scenario.name, scenario.fault, "trainer" if scenario.trainer else "protocol")
    options = WorkerOptions()
    ctx = Context(stack, f"chaos-{scenario.name}", [], options, out.notes)
    started = time.monotonic()
    consumer: ProtocolConsumer | None = None
    try:
        tasks = make_tasks(scenario.tasks, scenario.samples, scenario.sleep_s)
        expected = expected_ids(tasks)
        out.expected = len(expected)
        ctx.workers = stack.start_workers(ctx.run, scenario.workers, options)
        out.notes.append(f"{scenario.workers} workers up in {time.monotonic() - started:.1f}s")
        if scenario.prepare is not None:
            scenario.prepare(ctx)
        deadline = time.monotonic() + timeout_s
        if scenario.trainer:
            _trainer_run(stack, scenario, ctx, tasks, workdir / scenario.name, deadline, out)
        else:
            consumer = ProtocolConsumer(
                stack.redis_url, ctx.run, workdir / f"{scenario.name}.accepted.jsonl",
                stack.models / "policy" / "model.safetensors", workdir / scenario.name / "weights",
                publish_every=4,
            ).start()  # fmt: skip
            _protocol_run(stack, scenario, ctx, tasks, consumer, deadline, out)
    except Exception as exc:  # reported in the table, the suite goes on
        out.error = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        if consumer is not None:
            consumer.stop()
        stop_all([*ctx.workers, *([ctx.trainer] if ctx.trainer else [])], timeout_s=8)
        out.elapsed_s = time.monotonic() - started
    return out


def _enqueue(stack: Stack, run: str, tasks: list[rollout_pb2.Task], retry_s: float = 60.0) -> None:
    """Enqueue (idempotent by task_id), retried while Redis is restarting."""
    import redis

    from services.common.streams import connect, enqueue_tasks

    give_up = time.monotonic() + retry_s
    while True:
        try:
            r = connect(stack.redis_url)
            try:
                enqueue_tasks(r, run, tasks)
            finally:
                r.close()
            return
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > give_up:
                raise
            time.sleep(0.5)


def _supervise(ctx: Context) -> None:
    """A supervisor's job: restart a worker that died without being killed by the scenario."""
    for worker in list(ctx.workers):
        if not worker.running() and not worker.killed_by_us:
            ctx.crashes += 1
            ctx.notes.append(f"{worker.name} exited by itself ({worker.returncode()}); restarted")
            ctx.restart_worker(worker)


def _protocol_run(
    stack: Stack,
    scenario: Scenario,
    ctx: Context,
    tasks: list[rollout_pb2.Task],
    consumer: ProtocolConsumer,
    deadline: float,
    out: Outcome,
) -> None:
    expected = expected_ids(tasks)
    # Half the tasks before the fault, half after it: on a fast machine the whole run could otherwise be
    # over before the fault, leaving nothing to measure recovery on.
    half = max(1, len(tasks) // 2)
    _enqueue(stack, ctx.run, tasks[:half])
    _wait(lambda: len(consumer.ids()) >= 0.3 * len(expected) or consumer.error is not None, deadline, ctx)
    ctx.fault_at = None
    scenario.inject(ctx)
    fault_at = ctx.fault_at or time.time()
    _enqueue(stack, ctx.run, tasks[half:])
    _wait(lambda: expected <= consumer.ids() or consumer.error is not None, deadline, ctx)
    _settle(stack, ctx.run, deadline)
    if consumer.error is not None:
        raise consumer.error
    _wait(lambda: _workers_on(ctx.workers, consumer.published), time.monotonic() + 30, ctx, strict=False)
    accepted = consumer.snapshot()
    times = sorted(a.at for a in accepted)
    ids = [a.trajectory_id for a in accepted]
    versions = [(a.policy_version, a.published) for a in accepted]
    _account(stack, ctx, out, expected, ids, times, fault_at, consumer.published, versions)
    out.scoring_failures = sum(1 for a in accepted if a.failures)
    if consumer.redis_errors:
        out.notes.append(f"consumer rode out {consumer.redis_errors} Redis errors")


def _trainer_run(
    stack: Stack,
    scenario: Scenario,
    ctx: Context,
    tasks: list[rollout_pb2.Task],
    out_dir: Path,
    deadline: float,
    out: Outcome,
) -> None:
    expected = expected_ids(tasks)
    per_step = 4
    steps = len(expected) // per_step
    tail = [
        "--task-source", "none", "--reward", "psgpo", "--steps", str(steps),
        "--trajectories-per-step", str(per_step), "--minibatch-size", str(per_step), "--update-epochs", "1",
        "--checkpoint-every", "1", "--sync-every", "1", "--max-staleness", "-1", "--prefetch-steps", "0",
        "--batch-timeout-s", "180", "--claim-idle-ms", "15000", "--lr", "1e-4", "--critic-lr", "1e-4",
        "--device", "cpu", "--torch-threads", "1",
    ]  # fmt: skip
    ctx.restart_trainer = lambda: stack.start_trainer(ctx.run, out_dir, tail)
    ctx.trainer = ctx.restart_trainer()
    _enqueue(stack, ctx.run, tasks)
    pointer = out_dir / "checkpoints" / "latest"

    def committed() -> int:
        text = pointer.read_text().strip() if pointer.is_file() else ""
        return int(text.removeprefix("step-")) if text else 0

    _wait(lambda: committed() >= 2 or not ctx.trainer.running(), deadline, ctx)  # type: ignore[union-attr]
    if committed() < 2:
        raise RuntimeError(f"trainer stopped before step 2:\n{ctx.trainer.tail()}")  # type: ignore[union-attr]
    scenario.inject(ctx)
    fault_at = ctx.fault_at or time.time()
    restarts = 0
    while time.monotonic() < deadline:
        assert ctx.trainer is not None
        if ctx.trainer.running():
            time.sleep(0.2)
            _supervise(ctx)
            continue
        if ctx.trainer.returncode() == 0:
            break
        if restarts >= 3:
            raise RuntimeError(f"trainer failed {restarts + 1} times:\n{ctx.trainer.tail()}")
        restarts += 1
        ctx.crashes += 1
        code = ctx.trainer.returncode()
        out.notes.append(f"trainer exited ({code}): {_last_error(ctx.trainer)}; restarted")
        ctx.trainer = ctx.restart_trainer()
    else:
        raise TimeoutError(f"trainer not done before the deadline:\n{ctx.trainer.tail()}")  # type: ignore[union-attr]
    _settle(stack, ctx.run, deadline)
    rows = [json.loads(line) for line in (out_dir / "trained_ids.jsonl").read_text().splitlines() if line]
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    published = [m["published_version"] for m in metrics if m.get("published_version") is not None]
    _wait(lambda: _workers_on(ctx.workers, published), time.monotonic() + 30, ctx, strict=False)
    ids = [tid for row in rows for tid in row["ids"]]
    times = sorted(m["time"] for m in metrics)  # one commit per step: when its trajectories were taken
    versions = [(v, steps) for row in rows for v in row["versions"]]
    _account(stack, ctx, out, expected, ids, times, fault_at, published, versions)
    out.scoring_failures = sum(int(m.get("skipped/total", 0)) for m in metrics)


def _last_error(proc: Proc) -> str:
    """The last line of the log that is not a progress bar (the exception of a traceback)."""
    lines = [ln for ln in re.split(r"[\r\n]+", proc.log_text()) if ln.strip() and not ln.startswith("ppo:")]
    return lines[-1][-300:] if lines else "no output"


def _wait(done: Callable[[], bool], deadline: float, ctx: Context, strict: bool = True) -> None:
    """Until `done()`, restarting crashed workers meanwhile; past `deadline` TimeoutError (`strict`) or
    return (the caller's checks then report what is missing)."""
    while not done():
        if time.monotonic() > deadline:
            if strict:
                raise TimeoutError("scenario deadline passed")
            return
        _supervise(ctx)
        time.sleep(0.1)


def _settle(stack: Stack, run: str, deadline: float) -> None:
    """Until nothing is pending in either group (stragglers would show up as duplicates), at most 15 s."""
    from services.common.streams import connect

    r = connect(stack.redis_url)
    end = min(deadline, time.monotonic() + 15)
    try:
        while time.monotonic() < end and _pending(r, run) > 0:
            time.sleep(0.2)
        time.sleep(1.0)  # a redelivery in flight would land now
    finally:
        r.close()


def _account(
    stack: Stack,
    ctx: Context,
    out: Outcome,
    expected: set[str],
    ids: list[str],
    times: list[float],
    fault_at: float,
    published: list[int],
    versions: list[tuple[int, int]],
) -> None:
    from services.common.streams import connect

    k = keys.run_keys(ctx.run)
    r = connect(stack.redis_url)
    try:
        acked = {m.decode() for m in r.smembers(k.trajectories_acked)}
        out.dead_letters = int(r.xlen(k.dead)) if r.exists(k.dead) else 0
        out.pending_left = _pending(r, ctx.run)
    finally:
        r.close()
    tally(out, expected, ids, acked)
    out.recovery_s, out.max_gap_s = recovery(times, fault_at)
    out.crashes = ctx.crashes
    live = {w.name: w.swapped_versions() for w in ctx.workers}
    every = {p.log_path.name: p.swapped_versions() for p in _all_workers(stack, ctx)}
    out.versions_ok, out.versions = check_versions(published, live, every, versions)


def _all_workers(stack: Stack, ctx: Context) -> list[Proc]:
    """Every incarnation of this scenario's rollout workers (killed ones included)."""
    return [p for p in stack.procs if p.name.startswith(f"{ctx.run}-w")]


def _workers_on(workers: list[Proc], published: list[int]) -> bool:
    newest = published[-1] if published else 0
    return all(w.running() and (w.swapped_versions() or [0])[-1] == newest for w in workers)


def _pending(r: Any, run: str) -> int:
    k = keys.run_keys(run)
    total = 0
    for stream, group in ((k.tasks, keys.TASKS_GROUP), (k.trajectories, keys.TRAJECTORIES_GROUP)):
        if r.exists(stream):
            from services.common.streams import backlog

            total += backlog(r, stream, group).unconsumed
    return total


def _consumers(r: Any, stream: str) -> list[dict[str, Any]]:
    if not r.exists(stream):
        return []
    return list(r.xinfo_consumers(stream, keys.TASKS_GROUP))


def _consumer_pending(r: Any, stream: str, name: str) -> int:
    return next((int(c["pending"]) for c in _consumers(r, stream) if _text(c["name"]) == name), 0)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


# =====================================================================================================
# The suite
# =====================================================================================================


def run_chaos(
    out: Path, names: list[str] | None = None, models: Path | None = None, timeout_s: float = 240.0
) -> list[Outcome]:
    """Runs the named scenarios (all by default) on one stack; prints the table, writes
    OUT/chaos.json and OUT/chaos.md. Every process is killed before it returns."""
    names = names or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UserError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="psgpo-chaos-", dir=out))
    if models is None:
        from trainer.models.tiny import TinyConfig, build_tiny

        models = workdir / "models"
        build_tiny(models, TinyConfig(corpus_bytes=600_000, max_positions=512))
    outcomes: list[Outcome] = []
    started = time.monotonic()
    load_before = os.getloadavg()
    with Stack(models, workdir) as stack:
        try:
            stack.start()
        except RuntimeError as exc:
            raise UserError(f"chaos: the stack did not start: {exc}") from None
        up = time.monotonic() - started
        print(f"chaos: stack up in {up:.1f}s (logs in {workdir / 'logs'})", flush=True)
        for name in names:
            outcome = run_scenario(stack, SCENARIOS[name], workdir, timeout_s)
            outcomes.append(outcome)
            status = "ok" if outcome.ok else f"FAILED {outcome.error or ''}"
            notes = "; ".join(outcome.notes)
            print(f"chaos: {name}: {status} ({outcome.elapsed_s:.1f}s; {notes})", flush=True)
    report = table(outcomes)
    print(report, flush=True)
    (out / "chaos.md").write_text(report + "\n")
    payload = {
        "outcomes": [asdict(o) | {"ok": o.ok} for o in outcomes],
        "total_s": time.monotonic() - started,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "workdir": str(workdir),
    }
    (out / "chaos.json").write_text(json.dumps(payload, indent=2) + "\n")
    if all(o.ok for o in outcomes):  # keep logs and records; drop weights, checkpoints, built models
        for heavy in ("models", "weights-cache", "*/checkpoints", "*/weights", "*/policy"):
            for path in workdir.glob(heavy):
                shutil.rmtree(path, ignore_errors=True)
    return outcomes


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
