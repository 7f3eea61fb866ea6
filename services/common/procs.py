"""Start `psgpo serve ...` as child processes and read the ports they bound (demo, bench, tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
