"""One run's fork, isolation and watch in C (csrc/runner.c), loaded with ctypes; Python when not built.

`python -m services.sandbox.native` compiles csrc/runner.c into a shared library next to it (`make
setup` and the sandbox image do; it needs a C compiler and nothing else: no Python headers). A worker
uses the library when it is there and SANDBOX_NATIVE_RUNNER is on, and executor.py's Python steps
otherwise (`_isolate`, `_supervise`, `_reap_all`); both do the same, and the tests run both against
each other. What it saves is the Python the worker and the run executed around every fork, and the
pages that code touched (docs/sandbox.md, Performance).

The buffers the C code reads the run's pipes into are mapped once per worker with MADV_DONTFORK: a
run's fork neither copies them nor write-protects them, and they never reach a run.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

from services.sandbox.frames import RESULT_FD

SOURCE = Path(__file__).with_name("csrc") / "runner.c"
LIBRARY = SOURCE.with_name("libpsgpo_runner.so")
STREAMS = ("stdout", "stderr", "result")

_Three = ctypes.c_int * 3
_Four = ctypes.c_int * 4
_Pointers = ctypes.c_void_p * 3
_Longs = ctypes.c_long * 3
_Out = ctypes.c_long * 7


def build(compiler: str | None = None) -> str:
    """Compile the library (when it is missing or older than its source); one line saying what happened.
    Raises RuntimeError when there is no compiler or the compile fails."""
    import shutil  # here, not at the top: a worker imports this module, and shutil would put its
    import subprocess  # compression libraries into every run's fork (runfiles.py)

    if LIBRARY.exists() and LIBRARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return f"up to date: {LIBRARY}"
    cc = compiler or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH: workers will use the Python runner")
    partial = LIBRARY.with_suffix(".so.tmp")
    command = [cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
    partial.replace(LIBRARY)
    return f"built {LIBRARY}"


class NativeRunner:
    """One per worker: the library's two functions with their argument types, and the three buffers."""

    def __init__(self, library: ctypes.CDLL, caps: tuple[int, int, int]) -> None:
        long, double = ctypes.c_long, ctypes.c_double
        self._fork_run = library.psgpo_fork_run
        self._fork_run.argtypes = [_Four, ctypes.c_int, ctypes.c_char_p, long, long, ctypes.c_int, long, long]
        self._fork_run.restype = long
        self._watch = library.psgpo_watch
        self._watch.argtypes = [long, _Three, _Pointers, _Longs, double, double, _Out]
        self._watch.restype = ctypes.c_int
        self.buffers = [mmap.mmap(-1, cap + 1) for cap in caps]  # one byte past each cap
        for buffer in self.buffers:
            buffer.madvise(mmap.MADV_DONTFORK)
        addresses = [ctypes.addressof(ctypes.c_char.from_buffer(buffer)) for buffer in self.buffers]
        self.fds, self.child_fds, self.caps, self.out = _Three(), _Four(), _Longs(*caps), _Out()
        self.pointers = _Pointers(*addresses)

    def fork_run(
        self,
        fds: tuple[int, int, int, int],
        run_dir: bytes,
        address_space: int,
        cpu_seconds: int,
        landlock_fd: int,
        uid: int,
        worker_pid: int,
    ) -> int:
        """fork(); the child is isolated (csrc/runner.c) when this returns 0 in it. The pid in the worker."""
        self.child_fds[0], self.child_fds[1], self.child_fds[2], self.child_fds[3] = fds
        pid = self._fork_run(
            self.child_fds, RESULT_FD, run_dir, address_space, cpu_seconds, landlock_fd, uid, worker_pid
        )
        if pid < 0:
            raise OSError(-pid, f"fork: {os.strerror(-pid)}")
        return pid

    def watch(self, pid: int, fds: tuple[int, int, int], deadline: float, drain_s: float) -> tuple[int, ...]:
        """Watch, kill and reap the run (csrc/runner.c); closes the three pipes. Returns out[0..6]."""
        self.fds[0], self.fds[1], self.fds[2] = fds
        failed = self._watch(pid, self.fds, self.pointers, self.caps, deadline, drain_s, self.out)
        if failed:
            raise OSError(-failed, "pidfd_open of the run failed")
        return tuple(self.out)

    def data(self, stream: int, size: int) -> bytes:
        return self.buffers[stream][:size]


def load(caps: tuple[int, int, int]) -> tuple[NativeRunner | None, str]:
    """The C runner, or None and why not (a line for the worker's report)."""
    if not LIBRARY.exists():
        return None, f"Python (not built: python -m services.sandbox.native builds {LIBRARY.name})"
    try:
        return NativeRunner(ctypes.CDLL(str(LIBRARY)), caps), f"C ({LIBRARY.name})"
    except (OSError, AttributeError) as exc:
        return None, f"Python ({LIBRARY.name} does not load: {exc})"


def main() -> None:
    try:
        print(build())
    except RuntimeError as exc:
        print(f"sandbox native runner not built: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
