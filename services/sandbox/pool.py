"""The service's side of the workers: start them, hand each job to an idle one, restart the dead.

Workers are separate interpreters started with an empty environment (`python -I`), so they share no
memory with the service. One job at a time per worker: concurrency is the number of workers, and
the number of jobs waiting for one is what the core bounds (429 above `max_queue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from services.sandbox.config import SandboxSettings
from services.sandbox.isolation import Layer
from services.sandbox.worker import WorkerConfig

log = logging.getLogger(__name__)
LENGTH = struct.Struct(">I")
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from services.sandbox.worker import main; main(sys.argv[2], sys.argv[3])"
)
BACKSTOP_GRACE_S = 10.0  # a worker that overruns its job's deadline by this much is killed


class WorkerCrashed(RuntimeError):
    """The worker died or stopped answering: the job has no verdict (never reported as a result)."""


@dataclass(slots=True)
class WorkerHandle:
    slot: int
    process: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    layers: list[Layer]
    uid: int | None
    jobs: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(slots=True)
class PoolStats:
    busy: int = 0
    waiting: int = 0
    restarts: int = 0
    alive: int = 0


class WorkerPool:
    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.root = Path(settings.work_dir or tempfile.mkdtemp(prefix=f"psgpo-sandbox-{os.getpid()}-"))
        self._owns_root = settings.work_dir is None
        self.idle: asyncio.Queue[WorkerHandle] = asyncio.Queue()
        self.handles: dict[int, WorkerHandle] = {}
        self.stats = PoolStats()
        self.layers: list[Layer] = []
        self._closing = False
        self._next_id = 0
        self._exchanges: set[asyncio.Future[dict[str, Any]]] = set()  # referenced until done
        self.uid_base = pick_uid_base(settings) if settings.separate_uid and os.getuid() == 0 else None
        self.cpus = pin_plan(settings.workers) if settings.pin_cpus else []

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        handles = await asyncio.gather(*(self._spawn(slot) for slot in range(self.settings.workers)))
        for handle in handles:
            self.handles[handle.slot] = handle
            self.idle.put_nowait(handle)
        self.layers = handles[0].layers
        self.stats.alive = len(handles)

    async def stop(self) -> None:
        self._closing = True
        for handle in list(self.handles.values()):
            await self._shutdown(handle)
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
        return WorkerHandle(slot, process, reader, writer, layers, config.uid if os.getuid() == 0 else None)

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

    async def submit(self, job: dict[str, Any], payload: bytes, timeout_s: float) -> dict[str, Any]:
        """Run one job (already encoded as `payload`) on the next idle worker. The exchange with the
        worker is shielded: a caller that goes away (a client's deadline, a disconnect) cannot strand
        the worker mid-run; it finishes the run and goes back to the idle queue."""
        self.stats.waiting += 1
        try:
            handle = await self.idle.get()
            while handle.process.poll() is not None:  # died while idle (killed, OOM): replace it
                await self._replace(handle, f"exited with {handle.process.returncode} while idle")
                handle = await self.idle.get()
        finally:
            self.stats.waiting -= 1
        exchange = asyncio.ensure_future(self._exchange(handle, job, payload, timeout_s))
        self._exchanges.add(exchange)
        exchange.add_done_callback(self._exchanges.discard)
        return await asyncio.shield(exchange)

    async def _exchange(
        self, handle: WorkerHandle, job: dict[str, Any], payload: bytes, timeout_s: float
    ) -> dict[str, Any]:
        self.stats.busy += 1
        try:
            handle.writer.write(LENGTH.pack(len(payload)) + payload)
            await handle.writer.drain()
            reply = await asyncio.wait_for(_read(handle.reader), timeout_s + BACKSTOP_GRACE_S)
            if reply.get("id") != job["id"]:
                raise ValueError(f"answer to job {reply.get('id')}, not {job['id']}")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as exc:
            self.stats.busy -= 1
            await self._replace(handle, f"{type(exc).__name__}: {exc}")
            raise WorkerCrashed(
                f"sandbox worker {handle.slot} failed during a run ({type(exc).__name__})"
            ) from None
        self.stats.busy -= 1
        handle.jobs += 1
        self.idle.put_nowait(handle)
        return reply

    async def _replace(self, handle: WorkerHandle, why: str) -> None:
        log.error("sandbox worker %d (pid %d) failed: %s; restarting it", handle.slot, handle.pid, why)
        await asyncio.to_thread(self._kill, handle)  # waits for the process: off the event loop
        with contextlib.suppress(Exception):
            handle.writer.close()
        self.stats.alive -= 1
        if self._closing:
            return
        self.stats.restarts += 1
        try:
            fresh = await self._spawn(handle.slot)
        except RuntimeError:
            log.exception("sandbox worker %d could not be restarted", handle.slot)
            return
        self.handles[handle.slot] = fresh
        self.stats.alive += 1
        self.idle.put_nowait(fresh)


async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
    head = await reader.readexactly(LENGTH.size)
    body = await reader.readexactly(LENGTH.unpack(head)[0])
    return orjson.loads(body)


def _frame(message: dict[str, Any]) -> bytes:
    data = orjson.dumps(message)
    return LENGTH.pack(len(data)) + data


def pin_plan(workers: int) -> list[int]:
    """CPU of each worker slot: one each when there are exactly as many workers as CPUs this service
    may use (a run then starts on the CPU its worker just left, with no cross-CPU TLB flushes on fork);
    otherwise none. Fewer workers than CPUs usually means a share of a bigger machine (a container with
    a CPU quota still sees every CPU of the node): pinning to the first CPUs would pile services up."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if workers == len(cpus) else []


def pick_uid_base(settings: SandboxSettings) -> int:
    """The configured base, or a random block of uids that no process uses: two services on one host
    must never share run uids (they would share process limits and could signal each other)."""
    if settings.run_uid_base is not None:
        return settings.run_uid_base
    rng = random.SystemRandom()
    for _ in range(20):
        base = rng.randrange(1 << 8, 1 << 18) * 4096  # within [2**20, 2**30)
        if not any(processes_of_uid(uid) for uid in range(base, base + settings.workers)):
            return base
    raise RuntimeError("no free block of uids found for the sandbox runs")


def _uid_and_state(pid: str) -> tuple[int, str] | None:
    """Real uid and state from /proc/PID/status (the directory owner is root for non-dumpable tasks)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    uid = state = None
    for line in text.splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("State:"):
            state = line.split()[1]
    return (uid, state) if uid is not None and state is not None else None


def processes_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid` (a run slot's own uid)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _uid_and_state(entry)
            if info is not None and info[0] == uid and info[1] != "Z":
                found.append(int(entry))
    return found


def kill_uid(uid: int) -> int:
    """SIGKILL every process of a run slot's uid (the backstop when a worker itself had to die)."""
    killed = 0
    for pid in processes_of_uid(uid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed
