"""Start `psgpo serve ...` as child processes and read the ports they bound (demo, bench, tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PARENT_ENV = "PSGPO_PARENT_PID"  # set by a supervisor (`psgpo up`, `psgpo demo`) for the children it starts
LISTENING = re.compile(r"listening http=(?P<host>[^ ]+):(?P<http>\d+) grpc=[^ ]+:(?P<grpc>\d+)")


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def parent_env() -> dict[str, str]:
    """Environment for a child that must not outlive this process: the child's `psgpo` command reads it
    and asks the kernel for SIGTERM when this process dies, even by SIGKILL (see `die_with_parent`)."""
    return {PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """In a `psgpo` command started with `parent_env()`: SIGTERM when the parent process dies (Linux
    PR_SET_PDEATHSIG), so a killed supervisor leaves no trainer or worker writing into its runs; exit at
    once when the parent is already gone. The variable is removed, so this process's own children do
    not inherit it. The signal fires when the parent *thread* that started us exits: supervisors start
    children from their main thread."""
    import ctypes
    import signal

    value = os.environ.pop(PARENT_ENV, "")
    if not value.isdigit():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not Linux: nothing to do
    if os.getppid() != int(value):
        sys.exit(f"psgpo: the process that started this one ({value}) has exited")


def start_service(name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                  timeout: float = 120.0) -> ServiceProcess:  # fmt: skip
    """Run `psgpo serve NAME ARGS` (ports 0 unless given), wait for its "listening" line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", name, *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        match = LISTENING.search(line)
        if match:
            return ServiceProcess(name, proc, int(match["http"]), int(match["grpc"]), log_path)
    proc.kill()
    proc.wait()
    tail = log_path.read_text()[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"{name} service did not start; last log lines:\n{tail}")
