"""A pre-warmed worker process: started once (empty environment, fresh interpreter, never forked from
the server, so it holds none of the server's memory or secrets), it enters its own network and mount
namespaces, imports the modules programs commonly use, prepares Landlock and seccomp, and then runs
jobs from the service one at a time, one fork per run (executor.py).

Protocol on the inherited socket, both ways: 4-byte big-endian length, then a dict in `marshal` (the
service and its own worker trust each other; nothing a run writes is unmarshalled).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import marshal
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from types import CodeType
from typing import Any

from services.sandbox import hugepages, isolation, native
from services.sandbox.executor import Executor, Isolation, Limits, seal_worker_state
from services.sandbox.frames import COMPILE_ERROR
from services.sandbox.harness import ChildJob
from services.sandbox.precompile import precompile
from services.sandbox.rewrite import (
    InvalidTestCode,
    PreparedTests,
    prepare_assert_tests,
    prepare_humaneval_tests,
)
from services.sandbox.runfiles import prepare_run_dir
from services.sandbox.testruntime import take_snapshot
from services.sandbox.warmup import warm_up

LENGTH = struct.Struct(">I")
READ_ROOTS = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/sys/devices/system/cpu"]
RW = isolation.FS_READ_FILE | isolation.FS_WRITE_FILE
DEVICES = {
    "/dev/null": RW,
    "/dev/full": RW,
    "/dev/zero": isolation.FS_READ_FILE,
    "/dev/urandom": isolation.FS_READ_FILE,
    "/dev/random": isolation.FS_READ_FILE,
}
CACHE_SIZE = 512


@dataclass(slots=True)
class WorkerConfig:
    slot: int
    root: str  # this worker's directory for run dirs (a private tmpfs when namespaces work)
    project_root: str  # on sys.path of the worker only: runs neither see nor read it
    uid: int | None  # run as this uid/gid (None: keep the worker's)
    tmpfs_mb: int
    max_inodes: int
    namespaces: bool
    landlock: bool
    seccomp: bool
    preload: list[str]
    shadow: list[str]
    file_size: int
    open_files: int
    processes: int
    output_limit: int
    result_limit: int
    workers: int
    warm_up: bool = True
    precompile: bool = True  # the worker compiles the program before the fork (precompile.py)
    native_runner: bool = True  # fork, isolate and watch runs in C when it is built (native.py)
    huge_pages: bool = True  # the worker's heap in 2 MB pages (hugepages.py)
    cpu: int | None = None  # this worker and its runs stay on this CPU (None: anywhere)

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = marshal.dumps(message)
    sock.sendall(LENGTH.pack(len(data)) + data)


def receive(sock: socket.socket) -> dict[str, Any] | None:
    head = _recv_exact(sock, LENGTH.size)
    if head is None:
        return None
    body = _recv_exact(sock, LENGTH.unpack(head)[0])
    return None if body is None else marshal.loads(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 1 << 20))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


class Worker:
    def __init__(self, config: WorkerConfig, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.layers: list[isolation.Layer] = []
        self.rlimit_detail = ""
        self.cache: OrderedDict[tuple[str, str], PreparedTests | InvalidTestCode] = OrderedDict()
        self.executor = self._setup()
        self.executor.detach.append(sock)

    # ------------------------------------------------------------------------------------------ setup

    def _setup(self) -> Executor:
        cfg = self.config
        if cfg.cpu is not None:
            with contextlib.suppress(OSError):  # the CPU left this cgroup's set since the plan: run anywhere
                os.sched_setaffinity(0, {cfg.cpu})
        isolation.set_parent_death_signal(signal.SIGKILL)
        isolation.set_child_subreaper()
        isolation.set_no_new_privs()  # inherited by every run; Landlock and seccomp require it
        os.makedirs(cfg.root, mode=0o711, exist_ok=True)
        mounted, namespaced = self._namespaces()
        isolation.set_dumpable(False)  # after the namespaces: uid_map must be writable until then
        os.chmod(cfg.root, 0o711)
        if os.getuid() != 0 and namespaced:
            isolation.drop_capabilities()  # the user namespace gave us all of its capabilities
        uid = self._run_uid()
        path_map = self._mirror_paths(mounted) if uid is not None else {}
        self._preload()
        snapshot = take_snapshot(cfg.shadow)
        seccomp = self._seccomp()
        run_dir = os.path.join(cfg.root, "run")
        prepare_run_dir(run_dir, uid)
        runner, self.runner = None, "Python (SANDBOX_NATIVE_RUNNER is off)"
        if cfg.native_runner:
            runner, self.runner = native.load((cfg.output_limit, cfg.output_limit, cfg.result_limit))
        executor = Executor(Isolation(uid, run_dir, self._landlock(path_map, run_dir)), snapshot, runner)
        isolation.apply_worker_rlimits(cfg.file_size, cfg.open_files, self._process_limit(uid, namespaced))
        if cfg.warm_up:
            warm_up(snapshot)
        self.layers += [
            isolation.Layer("rlimits", True, self.rlimit_detail),
            isolation.Layer("process group", True, "own session, killed whole; escaped descendants swept"),
            isolation.Layer("empty environment", True, "no variables; worker started with an empty env"),
        ]
        seal_worker_state(run_dir, path_map, frozenset({cfg.project_root, "", "."}))
        if seccomp is not None:
            seccomp.apply()  # from here on the worker itself, and so every run, is under the filter
        gc.collect()
        gc.freeze()
        if cfg.huge_pages:
            hugepages.collapse()  # last: the heap has the shape it serves with (warmed up, frozen)
        return executor

    def _process_limit(self, uid: int | None, namespaced: bool) -> int:
        """RLIMIT_NPROC counts the tasks (threads too) of a uid. A run's own uid, or this worker's own
        user namespace, makes the count the run's; otherwise the count is shared with everything the
        service's uid runs, and the limit is that (counted now, this pid namespace only) plus a budget
        for the runs of every worker: approximate."""
        cfg = self.config
        if uid is not None or (namespaced and os.getuid() != 0):
            self.rlimit_detail = f"address space, CPU time, file size, open files, {cfg.processes} processes"
            return cfg.processes
        shared = count_uid_tasks(os.getuid()) + cfg.processes * cfg.workers
        self.rlimit_detail = (
            f"address space, CPU time, file size, open files; processes approximate ({shared} tasks for "
            "the service's uid: runs share it with the service)"
        )
        return shared

    def _namespaces(self) -> tuple[bool, bool]:
        """(tmpfs mounted, namespaces entered)."""
        if not self.config.namespaces:
            self.layers += [
                isolation.Layer("network namespace", False, "disabled by configuration"),
                isolation.Layer("tmpfs quota", False, "disabled by configuration"),
            ]
            return False, False
        net, quota = isolation.enter_namespaces(
            self.config.root, self.config.tmpfs_mb, self.config.max_inodes
        )
        self.layers += [net, quota]
        return quota.active, net.active

    def _run_uid(self) -> int | None:
        if self.config.uid is None:
            self.layers.append(isolation.Layer("separate uid", False, "disabled by configuration"))
            return None
        if os.getuid() != 0:
            self.layers.append(isolation.Layer("separate uid", False, "the service does not run as root"))
            return None
        self.layers.append(
            isolation.Layer("separate uid", True, f"runs as uid/gid {self.config.uid}, no groups")
        )
        return self.config.uid

    def _seccomp(self) -> isolation.SeccompProgram | None:
        if not self.config.seccomp:
            self.layers.append(isolation.Layer("seccomp", False, "disabled by configuration"))
            return None
        program, layer = isolation.build_seccomp_filter()
        self.layers.append(layer)
        return program

    def _landlock(self, path_map: dict[str, str], run_dir: str) -> isolation.LandlockRuleset | None:
        if not self.config.landlock:
            self.layers.append(isolation.Layer("landlock", False, "disabled by configuration"))
            return None
        abi = isolation.landlock_abi()
        self.layers.append(isolation.describe_landlock(abi))
        if not abi:
            return None
        return isolation.LandlockRuleset(abi, READ_ROOTS + self._python_roots(path_map), DEVICES, run_dir)

    def _mirror_paths(self, mounted: bool) -> dict[str, str]:
        """sys.path dirs the run's uid cannot reach (e.g. Python under /root) get a read-only bind
        mirror inside this worker's private mount namespace."""
        mirrors: dict[str, str] = {}
        for index, path in enumerate(p for p in sys.path if p and os.path.isdir(p)):
            if path == self.config.project_root or _world_readable(path) or not mounted:
                continue
            target = os.path.join(self.config.root, f".python-{index}")
            try:
                isolation.bind_readonly(path, target)
            except OSError:
                continue
            mirrors[path] = target
        return mirrors

    def _python_roots(self, path_map: dict[str, str]) -> list[str]:
        roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
        roots.update(path_map.get(p, p) for p in sys.path if p and os.path.isdir(p))
        project = self.config.project_root
        return sorted(r for r in roots if r != project and not project.startswith(r.rstrip("/") + "/"))

    def _preload(self) -> None:
        for name in self.config.preload:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001, S112 - an optional module that is not installed
                continue

    # ------------------------------------------------------------------------------------------ serve

    def serve(self) -> None:
        layers = [asdict(layer) for layer in self.layers]
        huge_kib = hugepages.huge_kib()
        send(self.sock, {"hello": os.getpid(), "layers": layers, "huge_kib": huge_kib, "runner": self.runner})
        while True:
            message = receive(self.sock)
            if message is None or message.get("exit"):
                return
            try:
                reply = self.handle(message)
            except Exception as exc:  # noqa: BLE001 - a sandbox bug: reported, never a verdict
                reply = {"id": message.get("id"), "internal_error": f"{type(exc).__name__}: {exc}"}
            send(self.sock, reply)

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        timeout = float(message["timeout_s"])
        limits = Limits(
            timeout_s=timeout,
            memory_mb=int(message["memory_mb"]),
            output_limit=cfg.output_limit,
            result_limit=cfg.result_limit,
        )
        deadline = time.monotonic() + timeout
        mode = message["mode"]
        reply: dict[str, Any] = {"id": message["id"]}
        if mode in ("assert", "humaneval"):
            prepared = self._prepare(mode, message["test"])
            if isinstance(prepared, InvalidTestCode):
                reply["test_error"] = str(prepared)
                return reply
            code, entry = message["code"], message.get("entry_point", "")
            job = ChildJob(mode, code, prepared, entry_point=entry, compiled=self._compiled(code))
            reply["tests_total"] = prepared.total
            reply["runs"] = [self.executor.run(job, None, limits, deadline).to_wire()]
        elif mode == "call":
            code, fn, args = message["code"], message["fn"], message["args"]
            job = ChildJob("call", code, fn=fn, args=args, compiled=self._compiled(code))
            reply["runs"] = [self.executor.run(job, None, limits, deadline).to_wire()]
        elif mode == "script":
            reply["runs"] = self._script(message["code"], message["stdins"], limits, deadline)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return reply

    def _script(self, code: str, stdins: list[str], limits: Limits, deadline: float) -> list[dict[str, Any]]:
        runs = []
        job = ChildJob("script", code, compiled=self._compiled(code))
        for stdin in stdins:
            raw = self.executor.run(job, stdin.encode(), limits, deadline)
            runs.append(raw.to_wire())
            compile_error = any(frame[0] == COMPILE_ERROR for frame in raw.frames)
            if raw.timed_out or raw.output_limit or compile_error or raw.setup_error:
                break  # the remaining cases are not run (and count as failed)
        return runs

    def _compiled(self, code: str) -> CodeType | None:
        return precompile(code) if self.config.precompile else None

    def _prepare(self, mode: str, test: str) -> PreparedTests | InvalidTestCode:
        key = (mode, test)
        cached = self.cache.get(key)
        if cached is not None:
            self.cache.move_to_end(key)
            return cached
        try:
            prepared: PreparedTests | InvalidTestCode = (
                prepare_humaneval_tests(test) if mode == "humaneval" else prepare_assert_tests(test)
            )
        except InvalidTestCode as exc:
            prepared = exc
        self.cache[key] = prepared
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return prepared


def count_uid_tasks(uid: int) -> int:
    """Tasks (threads included) of `uid` visible in this pid namespace."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip())
    return total


def _world_readable(path: str) -> bool:
    """True when a user with no special rights can list `path` (every ancestor searchable)."""
    current = os.path.abspath(path)
    first = True
    while True:
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return False
        needed = stat.S_IXOTH | (stat.S_IROTH if first else 0)
        if mode & needed != needed:
            return False
        parent = os.path.dirname(current)
        if parent == current:
            return True
        current, first = parent, False


def main(fd: str, config: str) -> None:
    sock = socket.socket(fileno=int(fd))
    worker = Worker(WorkerConfig.from_json(config), sock)
    worker.serve()
