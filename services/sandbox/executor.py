"""One run, from the worker's side: fork, isolate, supervise, kill, reap, clean up.

The worker process is trusted and single-threaded; it forks one child per run (a fork, not an
interpreter start: everything is already imported). The child enters every isolation layer, then
the harness; the worker reads stdout, stderr and the result channel through capped pipes, enforces
the wall-clock deadline with SIGKILL, and at the end kills the run's whole process group and every
process re-parented to it (it is a child subreaper), so nothing the run started survives it.

The fork, the isolation steps and the watch run in C when csrc/runner.c is built (native.py: the
same steps, measured 7-8% less CPU per run); the Python methods here are the fallback, and the tests
hold the two to the same results.
"""

from __future__ import annotations

import gc
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from services.sandbox import harness, isolation
from services.sandbox.frames import HEADER, NONCE_BYTES, RESULT_FD
from services.sandbox.harness import ChildJob
from services.sandbox.native import STREAMS, NativeRunner
from services.sandbox.runfiles import TempdirDefault, empty_run_dir, prepare_run_dir
from services.sandbox.testruntime import Snapshot, disable_tracing_hooks

SETUP_FAILED = 125  # exit code of a child whose isolation setup failed (a sandbox error)
DRAIN_SECONDS = 0.25  # after the run's process exits, how long to wait for buffered output


@dataclass(slots=True)
class Isolation:
    """What the worker prepared once and every run applies."""

    uid: int | None  # the run's uid and gid (None: the worker's own)
    run_dir: str  # the one directory runs may write: same inode every run, emptied after each
    landlock: isolation.LandlockRuleset | None


@dataclass(slots=True)
class Limits:
    timeout_s: float
    memory_mb: int
    output_limit: int  # per stream: stdout, stderr; and the result channel
    result_limit: int


@dataclass(slots=True)
class RawRun:
    """What the worker observed; the service turns it into a verdict (verdict.py)."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    output_limit: str = ""  # "stdout", "stderr" or "result" when a cap was hit
    stdout: bytes = b""
    stderr: bytes = b""
    result: bytes = b""  # the harness's frames, raw
    frames: list[tuple[int, int, bool, str]] = field(default_factory=list)
    tampered: str = ""
    duration_ms: float = 0.0
    setup_error: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "output_limit": self.output_limit,
            "stdout": self.stdout.decode("utf-8", "replace"),
            "stderr": self.stderr.decode("utf-8", "replace"),
            "frames": self.frames,
            "tampered": self.tampered,
            "duration_ms": self.duration_ms,
            "setup_error": self.setup_error,
        }


class Executor:
    def __init__(self, iso: Isolation, snapshot: Snapshot, native: NativeRunner | None = None) -> None:
        self.iso = iso
        self.snapshot = snapshot
        self.native = native  # fork, isolation and watch in C (native.py); None: the Python steps here
        self.counter = 0
        self.detach: list[socket.socket] = []  # the worker's own sockets: a run must not close them
        self._vsz = 0
        self.worker_pid = os.getpid()
        self._run_dir = os.fsencode(iso.run_dir)
        self.parent_death_signal = isolation.PreparedPrctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        prepare_run_dir(iso.run_dir, iso.uid)

    def _baseline(self) -> int:
        """The worker's address space, re-read every 64 runs (it grows only with caches)."""
        if self.counter % 64 == 1 or not self._vsz:
            self._vsz = _vsz()
        return self._vsz

    # ------------------------------------------------------------------------------------------ parent

    def run(self, job: ChildJob, stdin: bytes | None, limits: Limits, deadline: float) -> RawRun:
        self.counter += 1
        nonce = os.urandom(NONCE_BYTES)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        res_r, res_w = os.pipe2(os.O_CLOEXEC)
        stdin_fd = self._stdin(stdin)
        address_space = self._baseline() + limits.memory_mb * 1024 * 1024
        child_fds = (stdin_fd, out_w, err_w, res_w)
        started = time.monotonic()
        gc.freeze()
        try:
            pid = self._fork(child_fds, address_space, _cpu_seconds(limits))
        except OSError:  # EAGAIN, ENOMEM: no run started; its fds must not leak into the next one
            for fd in (out_r, out_w, err_r, err_w, res_r, res_w, stdin_fd):
                _close_quietly(fd)
            raise
        if pid == 0:
            self._child(job, limits, address_space, child_fds, nonce, isolated=self.native is not None)
        for fd in (out_w, err_w, res_w, stdin_fd):
            os.close(fd)
        raw = RawRun()
        try:
            if self.native is not None:
                self._watch_natively(pid, (out_r, err_r, res_r), deadline, raw)  # kills, reaps, closes
            else:
                pipes = {out_r: "stdout", err_r: "stderr", res_r: "result"}
                self._supervise(pid, pipes, limits, deadline, raw)
        finally:
            raw.duration_ms = (time.monotonic() - started) * 1000.0
            if self.native is None:
                _kill_group(pid)
                self._reap_all(pid, raw)
                for fd in (out_r, err_r, res_r):
                    _close_quietly(fd)
            empty_run_dir(self.iso.run_dir, self.iso.uid)
        raw.frames, raw.tampered = parse_frames(raw.result, nonce, pid)
        if raw.exit_code == SETUP_FAILED and not raw.frames:
            raw.setup_error = raw.stderr.decode("utf-8", "replace").strip() or "sandbox setup failed"
        return raw

    def _fork(self, fds: tuple[int, int, int, int], address_space: int, cpu_seconds: int) -> int:
        if self.native is None:
            return isolation.raw_fork()  # the child isolates itself (_isolate)
        iso = self.iso
        landlock = iso.landlock.fd if iso.landlock is not None else -1
        uid = iso.uid if iso.uid is not None else -1
        return self.native.fork_run(
            fds, self._run_dir, address_space, cpu_seconds, landlock, uid, self.worker_pid
        )

    def _stdin(self, data: bytes | None) -> int:
        if not data:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _supervise(
        self, pid: int, pipes: dict[int, str], limits: Limits, deadline: float, raw: RawRun
    ) -> None:
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        for fd in (*pipes, pidfd):
            poller.register(fd, select.POLLIN)
        buffers: dict[int, bytearray] = {fd: bytearray() for fd in pipes}
        caps = {
            fd: limits.result_limit if name == "result" else limits.output_limit for fd, name in pipes.items()
        }
        open_pipes = set(pipes)
        drain_until: float | None = None
        try:
            while open_pipes or drain_until is None:
                now = time.monotonic()
                if drain_until is not None and now >= drain_until:
                    break
                if drain_until is None and now >= deadline:
                    raw.timed_out = True
                    break
                stop = drain_until if drain_until is not None else deadline
                for fd, _event in poller.poll(max(0.0, stop - now) * 1000.0 + 1):
                    if fd == pidfd:
                        poller.unregister(pidfd)
                        self._collect_status(pid, raw)
                        _kill_group(pid)  # end of run: whatever it left behind dies now
                        drain_until = time.monotonic() + DRAIN_SECONDS
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        poller.unregister(fd)
                        open_pipes.discard(fd)
                        continue
                    buffers[fd] += chunk
                    if len(buffers[fd]) > caps[fd]:
                        raw.output_limit = pipes[fd]
                        del buffers[fd][caps[fd] :]
                        return
        finally:
            os.close(pidfd)
            for fd, name in pipes.items():
                setattr(raw, name, bytes(buffers[fd]))

    def _watch_natively(self, pid: int, fds: tuple[int, int, int], deadline: float, raw: RawRun) -> None:
        """What _supervise and _reap_all do, in C (csrc/runner.c)."""
        assert self.native is not None
        code, signal_number, timed_out, over, *sizes = self.native.watch(pid, fds, deadline, DRAIN_SECONDS)
        if code >= 0:
            raw.exit_code = code
        if signal_number:
            raw.signal = signal_number
        raw.timed_out = bool(timed_out)
        if over >= 0:
            raw.output_limit = STREAMS[over]
        raw.stdout, raw.stderr, raw.result = (self.native.data(i, size) for i, size in enumerate(sizes))

    def _collect_status(self, pid: int, raw: RawRun) -> None:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if got == pid:
            _record_status(raw, status)

    def _reap_all(self, pid: int, raw: RawRun) -> None:
        """Reap the run's process and every descendant re-parented to this subreaper."""
        while True:
            try:
                got, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if got == pid and raw.exit_code is None and raw.signal is None:
                _record_status(raw, status)
            if got != 0:
                continue
            for child in _children():
                _kill_group(child)
            try:
                got, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return
            if got == pid and raw.exit_code is None and raw.signal is None:
                _record_status(raw, status)

    # ------------------------------------------------------------------------------------------ child

    def _child(
        self,
        job: ChildJob,
        limits: Limits,
        address_space: int,
        fds: tuple[int, int, int, int],
        nonce: bytes,
        isolated: bool,
    ) -> NoReturn:
        """In the forked child: isolation (unless the C runner did it before returning), then the harness."""
        try:
            for sock in self.detach:
                sock.detach()
            if not isolated:
                self._isolate(limits, address_space, fds)
            random.seed()  # the fork skipped random's own after-fork reseed
        except BaseException as exc:  # noqa: BLE001 - report and exit: never run the program half-isolated
            try:
                os.write(fds[2], f"sandbox setup failed: {type(exc).__name__}: {exc}\n".encode())
            finally:
                os._exit(SETUP_FAILED)
        try:
            harness.run_child(job, self.snapshot, harness.Channel(RESULT_FD, nonce))
        finally:
            os._exit(1)

    def _isolate(self, limits: Limits, address_space: int, fds: tuple[int, int, int, int]) -> None:
        os.setsid()
        os.chdir(self.iso.run_dir)
        isolation.apply_run_rlimits(address_space, _cpu_seconds(limits))
        if self.iso.landlock is not None:
            self.iso.landlock.restrict_self()
        if self.iso.uid is not None:
            isolation.drop_privileges(self.iso.uid, self.iso.uid)
        self.parent_death_signal()  # SIGKILL; after the uid change, which clears it
        if os.getppid() != self.worker_pid:
            raise RuntimeError("the worker died while the run started")
        stdin_fd, out_w, err_w, res_w = fds
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(res_w, RESULT_FD)
        os.closerange(RESULT_FD + 1, 1 << 20)


def seal_worker_state(run_dir: str, path_map: dict[str, str], drop_paths: frozenset[str]) -> None:
    """Python-level state every run inherits, set once in the worker instead of in every child (each
    change made in a child costs page copies): no environment, the run dir as tempfile's default,
    sys.path without the project and with readable mirrors, the service's modules not importable by
    name (the harness stays loaded), ctypes refused (a speed bump against patching builtins in C)."""
    os.environ.clear()
    sys.meta_path.insert(0, TempdirDefault(run_dir))
    sys.path[:] = [path_map.get(p, p) for p in sys.path if p not in drop_paths]
    for name in [n for n in sys.modules if n == "services" or n.startswith("services.")]:
        del sys.modules[name]
    for name in ("ctypes", "_ctypes"):
        sys.modules[name] = None  # type: ignore[assignment]  # `import ctypes` raises ImportError
    disable_tracing_hooks()


def _cpu_seconds(limits: Limits) -> int:
    """RLIMIT_CPU of a run: its timeout, rounded up, plus a second (the wall-clock deadline comes first)."""
    return max(1, int(limits.timeout_s + 1.999))


def _record_status(raw: RawRun, status: int) -> None:
    if os.WIFEXITED(status):
        raw.exit_code = os.WEXITSTATUS(status)
    elif os.WIFSIGNALED(status):
        raw.signal = os.WTERMSIG(status)


def parse_frames(data: bytes, nonce: bytes, pid: int) -> tuple[list[tuple[int, int, bool, str]], str]:
    """Frames the harness wrote, checked: a wrong nonce or pid, or a broken frame, is tampering."""
    frames: list[tuple[int, int, bool, str]] = []
    pos = 0
    head = len(nonce) + HEADER.size
    while pos < len(data):
        if pos + 4 > len(data):
            return frames, "truncated frame on the result channel"
        (size,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if size < head or pos + size > len(data):
            return frames, "malformed frame on the result channel"
        body = data[pos : pos + size]
        pos += size
        if body[: len(nonce)] != nonce:
            return frames, "a frame without the run's nonce on the result channel"
        kind, index, ok, sender = HEADER.unpack_from(body, len(nonce))
        if sender != pid:
            return frames, f"a report from another process (pid {sender}) on the result channel"
        frames.append((kind, index, bool(ok), body[head:].decode("utf-8", "replace")))
    return frames, ""


def _vsz() -> int:
    """This process's address space now: the run's memory limit is added on top of it."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _children() -> list[int]:
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        pass
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                found.append(int(entry))
    return found


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
