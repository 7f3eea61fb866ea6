"""The real local stack the chaos suite (services/chaos.py) breaks: every piece a subprocess on loopback.

- `Proc`: one child process in its own session, logging to a file; `kill()` SIGKILLs its process
  group and every descendant (the sandbox's workers run in sessions of their own).
- `Stack`: Redis (AOF, `appendfsync always`, its own dir, so a crash + restart on the same port keeps
  every acknowledged write), the sandbox and PRM services (restartable on the same ports), and rollout
  workers; `close()` kills everything it ever started.
- `ProtocolConsumer`: the trainer's side of the Redis protocol without the training (read group
  `trainer`, append the batch to a durable record, then XACK + SADD acked in one MULTI), publishing a
  new policy version every `publish_every` accepted trajectories, as a trainer step would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from services.common.redis_local import LocalRedis, start_redis

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening http=[^ ]+:(?P<http>\d+) grpc=[^ ]+:(?P<grpc>\d+)")
WORKER_READY = re.compile(r"rollout worker ready run=")
SWAPPED = re.compile(r"policy hot-swapped to version (\d+)")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every child: one torch thread each (2 cores are shared by the whole stack)."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


@dataclass
class Proc:
    """One incarnation of a child process (a restart is a new Proc with a new log)."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=child_env)
    popen: subprocess.Popen[bytes] | None = None
    killed_by_us: bool = False

    def launch(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, chars: int = 1500) -> str:
        return self.log_text()[-chars:]

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        """The first match of `pattern` in the log; RuntimeError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = pattern.search(self.log_text())
            if match:
                return match
            if not self.running():
                raise RuntimeError(f"{self.name} exited ({self.returncode()}) before ready:\n{self.tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.tail()}")

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def descendants(self) -> list[psutil.Process]:
        if not self.running():
            return []
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill(self) -> None:
        """SIGKILL the process, its group and every descendant (found before the kill)."""
        if not self.running():  # already reaped: its pid may belong to someone else now
            return
        self.killed_by_us = True
        below = self.descendants()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in below:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(15)  # type: ignore[union-attr]

    def terminate(self) -> None:
        """SIGTERM: a clean stop (the caller waits, then `kill()`s what is left)."""
        if self.running():
            self.killed_by_us = True
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_all([self], timeout_s)

    def swapped_versions(self) -> list[int]:
        """Policy versions this worker incarnation hot-swapped to, in order (from its log)."""
        return [int(v) for v in SWAPPED.findall(self.log_text())]


def stop_all(procs: list[Proc], timeout_s: float = 10.0) -> None:
    """SIGTERM every process, wait up to `timeout_s` in all for them to exit, SIGKILL what is left."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        if proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
        proc.kill()


def psgpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


@dataclass
class WorkerOptions:
    tasks_per_batch: int = 2
    claim_idle_ms: int = 15_000
    scoring_retries: int = 12  # backoff 0.1 s doubling to 2 s: ~20 s of retries ride out a PRM restart
    scoring_timeout_s: float = 30.0


class Stack:
    """Redis + sandbox + PRM for the whole suite; rollout workers per scenario (`start_workers`)."""

    def __init__(self, models: Path, workdir: Path, sandbox_workers: int = 2, ready_timeout_s: float = 180.0):
        self.models = models
        self.workdir = workdir
        self.sandbox_workers = sandbox_workers
        self.ready_timeout_s = ready_timeout_s
        self.redis_dir = workdir / "redis"
        self.redis: LocalRedis | None = None
        self.redis_port = 0
        self.sandbox: Proc | None = None
        self.prm: Proc | None = None
        self.ports: dict[str, tuple[int, int]] = {}  # service -> (http, grpc), kept across restarts
        self.procs: list[Proc] = []  # every incarnation ever started, for close()
        self._counts: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_redis()
        self.sandbox = self._launch_service("sandbox", ["--workers", str(self.sandbox_workers)])
        self.prm = self._launch_service("prm", ["--model", str(self.models / "prm"), "--device", "cpu"])
        for proc in (self.sandbox, self.prm):
            self._ready_service(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.kill()
        if self.redis is not None:
            self.redis.kill()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Redis -----------------------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self) -> None:
        self.redis = start_redis(
            port=self.redis_port, data_dir=self.redis_dir, appendonly=True, appendfsync="always"
        )
        self.redis_port = self.redis.port

    def kill_redis(self) -> None:
        """A crash: SIGKILL, no shutdown save (the AOF with `appendfsync always` holds every write)."""
        assert self.redis is not None
        self.redis.kill()

    # -- services --------------------------------------------------------------------------------------

    def _log(self, name: str) -> Path:
        self._counts[name] = self._counts.get(name, 0) + 1
        return self.workdir / "logs" / f"{name}.{self._counts[name]}.log"

    def _launch_service(self, name: str, args: list[str]) -> Proc:
        http, grpc = self.ports.get(name, (0, 0))
        argv = psgpo("serve", name, "--http-port", str(http), "--grpc-port", str(grpc), *args)
        proc = Proc(name, argv, self._log(name)).launch()
        self.procs.append(proc)
        return proc

    def _ready_service(self, proc: Proc) -> None:
        match = proc.wait_for(LISTENING, self.ready_timeout_s)
        self.ports[proc.name] = (int(match["http"]), int(match["grpc"]))

    def grpc_target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name][1]}"

    def restart_prm(self) -> None:
        """A new PRM process on the same ports (the workers keep their gRPC target)."""
        self.prm = self._launch_service("prm", ["--model", str(self.models / "prm"), "--device", "cpu"])
        self._ready_service(self.prm)

    def sandbox_worker_pids(self) -> list[int]:
        """The sandbox service's pre-forked workers: its direct children."""
        assert self.sandbox is not None
        try:
            return [p.pid for p in psutil.Process(self.sandbox.pid).children()]
        except psutil.Error:
            return []

    def busy_sandbox_worker(self) -> int | None:
        """A sandbox worker with a run in progress (it has a child of its own), or None."""
        for pid in self.sandbox_worker_pids():
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).children():
                    return pid
        return None

    # -- rollout workers -------------------------------------------------------------------------------

    def launch_worker(self, run: str, consumer: str, options: WorkerOptions) -> Proc:
        env = child_env(
            ROLLOUT_TASKS_PER_BATCH=str(options.tasks_per_batch),
            ROLLOUT_CLAIM_IDLE_MS=str(options.claim_idle_ms),
            ROLLOUT_SCORING_RETRIES=str(options.scoring_retries),
            ROLLOUT_SCORING_TIMEOUT_S=str(options.scoring_timeout_s),
            ROLLOUT_MAX_BATCH_SEQUENCES="8",
            ROLLOUT_WEIGHTS_CACHE=str(self.workdir / "weights-cache" / consumer),
        )
        argv = psgpo(
            "serve", "rollout", "--policy", str(self.models / "policy"), "--redis", self.redis_url,
            "--prm", self.grpc_target("prm"), "--sandbox", self.grpc_target("sandbox"), "--run", run,
            "--consumer", consumer,
        )  # fmt: skip
        proc = Proc(consumer, argv, self._log(consumer), env=env).launch()
        self.procs.append(proc)
        return proc

    def start_workers(self, run: str, count: int, options: WorkerOptions) -> list[Proc]:
        workers = [self.launch_worker(run, f"{run}-w{i}", options) for i in range(count)]
        for worker in workers:
            worker.wait_for(WORKER_READY, self.ready_timeout_s)
        return workers

    def start_trainer(self, run: str, out: Path, argv_tail: list[str]) -> Proc:
        argv = psgpo(
            "train", "ppo", "--redis-url", self.redis_url, "--run", run,
            "--policy", str(self.models / "policy"), "--prm-model", str(self.models / "prm"),
            "--out-dir", str(out), *argv_tail,
        )  # fmt: skip
        proc = Proc("trainer", argv, self._log(f"{run}-trainer"), env=child_env()).launch()
        self.procs.append(proc)
        return proc


@dataclass
class Accepted:
    """One trajectory as the consumer durably recorded it."""

    trajectory_id: str
    entry_id: str
    policy_version: int
    at: float  # time.time() when recorded
    published: int  # newest version published when it was recorded
    failures: list[str]


class ProtocolConsumer:
    """A trainer without the training, run on a thread: every step of the real trainer's protocol.

    Read (own pending entries first, then new ones), append the batch to `record` and fsync (durable),
    then acknowledge (XACK + SADD psgpo:{run}:trajectories:acked, one MULTI). A batch recorded but not
    acknowledged when Redis fails is acknowledged before anything else is read (the trainer does the
    same with its checkpoint's `committed` list), and after a connection error the consumer re-reads its
    own pending entries (a reply lost in flight leaves entries delivered to it but never seen)."""

    def __init__(
        self,
        redis_url: str,
        run: str,
        record: Path,
        weights: Path,
        store: Path,
        publish_every: int,
        batch: int = 8,
        name: str = "chaos-trainer",
    ) -> None:
        self.redis_url, self.run, self.record_path, self.weights = redis_url, run, record, weights
        self.store, self.publish_every, self.batch, self.name = store, publish_every, batch, name
        self.accepted: list[Accepted] = []
        self.published: list[int] = []  # versions in the order this consumer published them
        self.redis_errors = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=f"consumer-{run}", daemon=True)

    def start(self) -> ProtocolConsumer:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def snapshot(self) -> list[Accepted]:
        with self._lock:
            return list(self.accepted)

    def ids(self) -> set[str]:
        with self._lock:
            return {a.trajectory_id for a in self.accepted}

    # -- the loop ---------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # surfaced by the scenario as its error
            self.error = exc

    def _loop(self) -> None:
        from services.common.streams import RETRYABLE, connect, trajectory_consumer
        from services.common.weights import WeightPublisher

        r = connect(self.redis_url, socket_timeout_s=5.0)
        consumer = None
        publisher = WeightPublisher(r, self.run, self.store, keep=3)
        unacked: list = []  # recorded, acknowledgement not confirmed yet
        since_publish = 0
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = trajectory_consumer(r, self.run, self.name, claim_idle_ms=60_000)
                if unacked:
                    consumer.ack(*unacked)  # idempotent: XACK + SADD
                    unacked = []
                if since_publish >= self.publish_every:
                    self._publish(r, publisher)
                    since_publish = 0
                batch = consumer.read(count=self.batch, block_ms=500)
                if not batch:
                    continue
                self._record(batch)
                unacked = batch
                consumer.ack(*batch)
                unacked = []
                since_publish += len(batch)
            except RETRYABLE:
                self.redis_errors += 1
                if consumer is not None:
                    consumer.rewind()
                self._stop.wait(0.3)
        r.close()

    def _record(self, batch: list) -> None:
        now = time.time()
        newest = self.published[-1] if self.published else 0
        rows = [
            Accepted(
                d.message.trajectory_id, d.id, int(d.message.policy_version), now, newest,
                [f"{f.component}: {f.reason}" for f in d.message.failures],
            )
            for d in batch
        ]  # fmt: skip
        with open(self.record_path, "a") as f:
            for row in rows:
                f.write(json.dumps(row.__dict__) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with self._lock:
            self.accepted.extend(rows)

    def _publish(self, r, publisher) -> None:  # redis.Redis, services.common.weights.WeightPublisher
        from services.common.weights import WeightsError, read_policy

        version = (self.published[-1] if self.published else 0) + 1
        try:
            publisher.publish(version, self.weights)
        except WeightsError:
            # refused as not newer: a retry after the reply of a successful publish was lost
            current = read_policy(r, self.run)
            if current is None or current.version != version:
                raise
        self.published.append(version)
