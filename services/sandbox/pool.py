"""The service's side of the workers: start them, hand each job to the least loaded, restart the dead.

Workers are separate interpreters started with an empty environment (`python -I`), so they share no
memory with the service. A worker runs one job at a time; the pool sends it up to `worker_queue`
jobs ahead (default 2), so that it starts the next as soon as it has answered the last, instead of
waiting for the service to notice and send one (measured: 0.24-0.39 ms idle per job, docs/sandbox.md).
A job is sent to a worker with a free slot, the least loaded first (an idle worker before a busy
one); the jobs waiting for a slot are what the core bounds (429 above `max_queue`).

Each worker has one reader task, which takes its answers in order; a watchdog timer per worker kills
it when the job it is running overruns its deadline by BACKSTOP_GRACE_S. A worker that dies, hangs
or answers out of order is replaced, and every job it held fails with WorkerCrashed (never a verdict;
the core retries each once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.sandbox.config import SandboxSettings
from services.sandbox.isolation import Layer
from services.sandbox.uids import kill_uid, pick_uid_base
from services.sandbox.worker import WorkerConfig

log = logging.getLogger(__name__)
LENGTH = struct.Struct(">I")
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from services.sandbox.worker import main; main(sys.argv[2], sys.argv[3])"
)
BACKSTOP_GRACE_S = 10.0  # a worker that overruns its job's deadline by this much is killed
RESPAWN_FIRST_DELAY_S, RESPAWN_MAX_DELAY_S = (
    0.5,
    30.0,
)  # a worker that cannot be restarted: retried, backing off


class WorkerCrashed(RuntimeError):
    """The worker died or stopped answering: the job has no verdict (never reported as a result)."""


@dataclass(slots=True)
class Pending:
    """A job sent to a worker, waiting for its answer."""

    job_id: int
    timeout_s: float
    answer: asyncio.Future[dict[str, Any]]


@dataclass(slots=True)
class WorkerHandle:
    slot: int
    process: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    layers: list[Layer]
    uid: int | None
    pending: deque[Pending] = field(default_factory=deque)  # sent, in order: the first is running
    reserved: int = 0  # slots promised to callers that have not sent their job yet
    lost: bool = False  # dead or being replaced: gets no more jobs
    replies: asyncio.Task[None] | None = None
    watchdog: asyncio.TimerHandle | None = None
    huge_kib: int = 0  # the worker's memory in 2 MB pages (hugepages.py), as it started
    runner: str = ""  # how it forks, isolates and watches runs: "C (...)" or "Python (why)" (native.py)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def load(self) -> int:
        return len(self.pending) + self.reserved


@dataclass(slots=True)
class PoolStats:
    waiting: int = 0
    restarts: int = 0
    alive: int = 0


class WorkerPool:
    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.root = Path(settings.work_dir or tempfile.mkdtemp(prefix=f"psgpo-sandbox-{os.getpid()}-"))
        self._owns_root = settings.work_dir is None
        self.depth = settings.worker_queue
        self.handles: dict[int, WorkerHandle] = {}
        self.stats = PoolStats()
        self.layers: list[Layer] = []
        self._closing = False
        self._next_id = 0
        self._waiters: deque[asyncio.Future[WorkerHandle]] = deque()  # callers waiting for a slot, FIFO
        self._replacing: set[asyncio.Task[None]] = set()  # referenced until done
        self.uid_base = pick_uid_base(settings) if settings.separate_uid and os.getuid() == 0 else None
        self.cpus = pin_plan(settings.workers) if settings.pin_cpus else []

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        handles = await asyncio.gather(*(self._spawn(slot) for slot in range(self.settings.workers)))
        for handle in handles:
            self._add(handle)
        self.layers = handles[0].layers
        self.stats.alive = len(handles)

    async def stop(self) -> None:
        self._closing = True
        for waiter in self._waiters:
            _fail(waiter, "the sandbox is stopping")
        for task in list(self._replacing):
            task.cancel()  # a restart waiting to retry
        for handle in list(self.handles.values()):
            handle.lost = True
            await self._shutdown(handle)
            self._fail_pending(handle, "the sandbox is stopping")
            if handle.replies is not None:
                handle.replies.cancel()
        self.handles.clear()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def worker_config(self, slot: int) -> WorkerConfig:
        s = self.settings
        uid = self.uid_base + slot if self.uid_base is not None else None
        return WorkerConfig(
            slot=slot,
            root=str(self.root / f"w{slot}"),
            project_root=PROJECT_ROOT,
            uid=uid,
            tmpfs_mb=s.disk_mb,
            max_inodes=s.max_inodes,
            namespaces=s.namespaces,
            landlock=s.landlock,
            seccomp=s.seccomp,
            preload=list(s.preload),
            shadow=s.shadowed(),
            file_size=s.file_size_mb * 1024 * 1024,
            open_files=s.open_files,
            processes=s.processes,
            output_limit=s.output_limit_bytes,
            result_limit=max(4 * s.output_limit_bytes, 4 * 1024 * 1024),
            workers=s.workers,
            warm_up=s.warm_up,
            precompile=s.precompile,
            native_runner=s.native_runner,
            huge_pages=s.huge_pages,
            cpu=self.cpus[slot] if self.cpus else None,
        )

    async def _spawn(self, slot: int) -> WorkerHandle:
        config = self.worker_config(slot)
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-B",
                    "-c",
                    BOOT,
                    PROJECT_ROOT,
                    str(theirs.fileno()),
                    config.to_json(),
                ],
                pass_fds=[theirs.fileno()],
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            hello = await asyncio.wait_for(_read(reader), self.settings.worker_start_timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"sandbox worker {slot} failed to start (exit code {process.returncode})"
            ) from exc
        layers = [Layer(**layer) for layer in hello["layers"]]
        uid = config.uid if os.getuid() == 0 else None
        return WorkerHandle(
            slot,
            process,
            reader,
            writer,
            layers,
            uid,
            huge_kib=hello.get("huge_kib", 0),
            runner=hello.get("runner", ""),
        )

    async def _shutdown(self, handle: WorkerHandle) -> None:
        with contextlib.suppress(Exception):
            handle.writer.write(_frame({"exit": True}))
            await asyncio.wait_for(handle.writer.drain(), 1.0)
        try:
            await asyncio.wait_for(asyncio.to_thread(handle.process.wait), 2.0)
        except TimeoutError:
            await asyncio.to_thread(self._kill, handle)
        with contextlib.suppress(Exception):
            handle.writer.close()

    def _kill(self, handle: WorkerHandle) -> None:
        """Kill a worker and, when runs have their own uid, every process left with that uid."""
        with contextlib.suppress(ProcessLookupError):
            handle.process.kill()
        with contextlib.suppress(Exception):
            handle.process.wait(5)
        if handle.uid is not None:
            kill_uid(handle.uid)

    # ------------------------------------------------------------------------------------------ jobs

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def free_slots(self) -> int:
        return sum(max(0, self.depth - h.load) for h in self.handles.values() if not h.lost)

    async def submit(self, job: dict[str, Any], payload: bytes, timeout_s: float) -> dict[str, Any]:
        """Run one job (already encoded as `payload`) on the least loaded worker with a free slot. Once
        sent, the job belongs to the worker's reader: a caller that goes away (a client's deadline, a
        disconnect) strands nothing; the worker runs it and its slot comes back."""
        self.stats.waiting += 1
        try:
            while True:
                handle = await self._slot()
                handle.reserved -= 1
                if not handle.lost:  # it can be lost between the hand-over and this caller's turn
                    break
        finally:
            self.stats.waiting -= 1
        pending = Pending(job["id"], timeout_s, asyncio.get_running_loop().create_future())
        handle.pending.append(pending)
        if len(handle.pending) == 1:
            self._watch(handle)
        handle.writer.write(LENGTH.pack(len(payload)) + payload)
        with contextlib.suppress(ConnectionError, OSError):  # a dead worker: its reader fails the job
            await handle.writer.drain()
        return await asyncio.shield(pending.answer)

    async def _slot(self) -> WorkerHandle:
        """A worker with a slot reserved for the caller: at once when one is free, else in turn."""
        if self._closing:
            raise WorkerCrashed("the sandbox is stopping")
        while self._waiters and self._waiters[0].done():  # callers that went away
            self._waiters.popleft()
        handle = self._least_loaded()
        if handle is not None and not self._waiters:
            handle.reserved += 1
            return handle
        waiter: asyncio.Future[WorkerHandle] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                waiter.result().reserved -= 1  # handed a slot just as the caller went away: give it back
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            self._hand_over()  # to the next caller (one may have queued behind this one meanwhile)
            raise

    def _least_loaded(self) -> WorkerHandle | None:
        best: WorkerHandle | None = None
        for handle in self.handles.values():
            if handle.lost or handle.load >= self.depth or (best is not None and handle.load >= best.load):
                continue
            if handle.process.poll() is not None:  # died while idle (killed, OOM): replace it first
                self._lose(handle, f"exited with {handle.process.returncode} while idle")
                continue
            best = handle
        return best

    def _hand_over(self) -> None:
        """Free slots go to the callers waiting for one, oldest first."""
        while self._waiters:
            handle = self._least_loaded()
            if handle is None:
                return
            waiter = self._waiters.popleft()
            if not waiter.done():
                handle.reserved += 1
                waiter.set_result(handle)

    async def _read_replies(self, handle: WorkerHandle) -> None:
        """The worker's answers, in the order its jobs were sent. The first problem (end of stream, a
        broken frame, an answer to another job) loses the worker."""
        try:
            while True:
                reply = await _read(handle.reader)
                if not handle.pending or reply.get("id") != handle.pending[0].job_id:
                    raise ValueError(f"an answer to job {reply.get('id')} out of turn")
                done = handle.pending.popleft()
                if handle.pending:
                    self._watch(handle)
                elif handle.watchdog is not None:
                    handle.watchdog.cancel()
                if not done.answer.done():
                    done.answer.set_result(reply)
                self._hand_over()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - IncompleteReadError, ConnectionError, bad JSON ...
            if not handle.lost:
                self._lose(handle, f"{type(exc).__name__}: {exc}")

    def _watch(self, handle: WorkerHandle) -> None:
        """Arm the backstop for the job the worker starts now (the first pending one)."""
        if handle.watchdog is not None:
            handle.watchdog.cancel()
        head = handle.pending[0]
        handle.watchdog = asyncio.get_running_loop().call_later(
            head.timeout_s + BACKSTOP_GRACE_S, self._overran, handle, head
        )

    def _overran(self, handle: WorkerHandle, head: Pending) -> None:
        if not handle.lost and handle.pending and handle.pending[0] is head:
            self._lose(handle, f"job {head.job_id} overran its deadline by {BACKSTOP_GRACE_S:.0f} s")

    def _lose(self, handle: WorkerHandle, why: str) -> None:
        """Take the worker out of service now; kill and replace it in the background."""
        handle.lost = True
        self._fail_pending(handle, f"sandbox worker {handle.slot} failed during a run ({why.split(':')[0]})")
        task = asyncio.ensure_future(self._replace(handle, why))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    def _fail_pending(self, handle: WorkerHandle, why: str) -> None:
        if handle.watchdog is not None:
            handle.watchdog.cancel()
        while handle.pending:
            _fail(handle.pending.popleft().answer, why)

    def runners(self) -> list[str]:
        return [self.handles[slot].runner for slot in sorted(self.handles)]

    def huge_kib(self) -> list[int]:
        """Each worker's memory in 2 MB pages as it started, by slot (hugepages.py)."""
        return [self.handles[slot].huge_kib for slot in sorted(self.handles)]

    def busy(self) -> int:
        """Workers running a job now."""
        return sum(1 for handle in self.handles.values() if handle.pending and not handle.lost)

    def _add(self, handle: WorkerHandle) -> None:
        self.handles[handle.slot] = handle
        handle.replies = asyncio.ensure_future(self._read_replies(handle))

    async def _replace(self, handle: WorkerHandle, why: str) -> None:
        log.error("sandbox worker %d (pid %d) failed: %s; restarting it", handle.slot, handle.pid, why)
        await asyncio.to_thread(self._kill, handle)  # waits for the process: off the event loop
        with contextlib.suppress(Exception):
            handle.writer.close()
        if handle.replies is not None and handle.replies is not asyncio.current_task():
            handle.replies.cancel()
        self.stats.alive -= 1
        delay = RESPAWN_FIRST_DELAY_S
        while not self._closing:
            try:
                fresh = await self._spawn(handle.slot)
            except (RuntimeError, OSError) as exc:
                log.error(
                    "sandbox worker %d could not be restarted (%s); retrying in %.1f s",
                    handle.slot,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, RESPAWN_MAX_DELAY_S)
                continue
            self._add(fresh)
            self.stats.alive += 1
            self.stats.restarts += 1
            self._hand_over()
            return


def _fail(future: asyncio.Future[Any], why: str) -> None:
    if not future.done():
        future.set_exception(WorkerCrashed(why))
        future.exception()  # retrieved: a caller that went away must not have it logged


async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
    head = await reader.readexactly(LENGTH.size)
    body = await reader.readexactly(LENGTH.unpack(head)[0])
    return marshal.loads(body)


def _frame(message: dict[str, Any]) -> bytes:
    data = marshal.dumps(message)
    return LENGTH.pack(len(data)) + data


def pin_plan(workers: int) -> list[int]:
    """CPU of each worker slot: one each when there are exactly as many workers as CPUs this service
    may use (a run then starts on the CPU its worker just left, with no cross-CPU TLB flushes on fork);
    otherwise none. Fewer workers than CPUs usually means a share of a bigger machine (a container with
    a CPU quota still sees every CPU of the node): pinning to the first CPUs would pile services up."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if workers == len(cpus) else []
