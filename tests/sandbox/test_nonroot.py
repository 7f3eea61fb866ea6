"""A worker started without root, as in an unprivileged container: it gets its namespaces from a user
namespace (where the kernel allows), drops the capabilities that gave it, and still contains runs.
Needs root here only to start the worker as `nobody`, and a system Python the `nobody` user can run
(the test venv's interpreter lives under /root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.sandbox.config import SandboxSettings
from services.sandbox.model import Status
from services.sandbox.pool import BOOT, PROJECT_ROOT, WorkerPool
from services.sandbox.verdict import Run, judge_tests
from services.sandbox.worker import receive, send

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="starting a worker as another user needs root"),
    pytest.mark.skipif(
        not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON} for the nobody user"
    ),
]


class Worker:
    def __init__(
        self, sock: socket.socket, process: subprocess.Popen[bytes], layers: dict[str, bool]
    ) -> None:
        self.sock, self.process, self.layers = sock, process, layers
        self.next_id = 0

    def run(self, code: str, test: str, timeout_s: float = 2.0) -> tuple[Run, int]:
        self.next_id += 1
        job = {"id": self.next_id, "mode": "assert", "code": code, "test": test, "timeout_s": timeout_s}
        send(self.sock, {**job, "memory_mb": 256})
        reply = receive(self.sock)
        assert reply is not None and "runs" in reply, reply
        return Run.from_wire(reply["runs"][0]), reply["tests_total"]


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    root = Path(tempfile.mkdtemp(prefix="psgpo-nonroot-"))
    os.chmod(root, 0o777)
    settings = SandboxSettings(workers=1)
    config = replace(WorkerPool(settings).worker_config(0), root=str(root / "w0"), uid=None, preload=["math"])
    ours, theirs = socket.socketpair()
    process = subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-B", "-c", BOOT, PROJECT_ROOT, str(theirs.fileno()), config.to_json()],
        pass_fds=[theirs.fileno()],
        env={},
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        start_new_session=True,
    )
    theirs.close()
    ours.settimeout(60)
    hello = receive(ours)
    assert hello is not None, "the worker did not start"
    layers = {layer["name"]: layer["active"] for layer in hello["layers"]}
    yield Worker(ours, process, layers)
    send(ours, {"exit": True})
    process.wait(10)
    shutil.rmtree(root, ignore_errors=True)


def _unprivileged_userns() -> bool:
    knob = Path("/proc/sys/kernel/unprivileged_userns_clone")
    limit = Path("/proc/sys/user/max_user_namespaces")
    return (not knob.exists() or knob.read_text().strip() == "1") and int(limit.read_text()) > 0


def test_layers_without_root(worker: Worker):
    assert worker.layers["separate uid"] is False  # needs root: reported off, not pretended
    assert worker.layers["rlimits"] and worker.layers["process group"]
    if _unprivileged_userns():
        assert worker.layers["network namespace"] and worker.layers["tmpfs quota"]
    if not worker.layers["landlock"] and not worker.layers["seccomp"]:
        pytest.skip("neither Landlock nor seccomp is available to an unprivileged process here")


def test_runs_pass_and_fail_as_usual(worker: Worker):
    run, total = worker.run("def f(x):\n    return x + 1\n", "assert f(1) == 2\nassert f(2) == 4\n")
    result = judge_tests(run, total, 1000)
    assert (result.status, result.tests_passed, result.tests_total) == (Status.FAILED, 1, 2)


def test_hostile_runs_are_contained(worker: Worker):
    parent = worker.process.pid
    started = time.monotonic()
    run, total = worker.run(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "assert True\n",
    )
    assert judge_tests(run, total, 1000).status is Status.TIMEOUT and time.monotonic() - started < 4
    run, total = worker.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "assert False\n")
    assert worker.process.poll() is None and worker.process.pid == parent
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 22), timeout=0.5)\n"
        "    print('connected')\n"
        "except OSError:\n"
        "    print('refused')\n"
    )
    run, _ = worker.run(code, "assert True\n")
    assert "connected" not in run.stdout and "refused" in run.stdout
    run, total = worker.run("import os\nos.setuid(0)\n", "assert True\n")
    assert judge_tests(run, total, 1000).status is Status.ERROR  # PermissionError while loading
