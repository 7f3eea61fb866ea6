"""`psgpo up` as a user runs it: a real subprocess with real Redis, sandbox, PRM and a rollout worker.
Trajectories flow; a killed worker is restarted; SIGINT stops every child; a second `up` on the same
data dir resumes with the same Redis data; a data dir from another version is refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.client.sdk import PsgpoRun

ROOT = Path(__file__).resolve().parents[2]
TESTS = {"kind": "assert", "code": "assert add(1, 2) == 3\n"}


def _start(data: Path, models: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--data-dir", str(data), "--policy",
         str(models / "policy"), "--prm", str(models / "prm"), "--any-ports", "--run", "uptest"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "psgpo up: ready" in line:
            return proc, line.split("REDIS_URL=")[1].split()[0]
    proc.kill()
    raise AssertionError("psgpo up did not become ready:\n" + "".join(lines[-30:]))


def _stop(proc: subprocess.Popen[str], data: Path) -> None:
    pids = json.loads((data / "up.json").read_text())["pids"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # every child is gone (reaped by up)


def _trajectories(url: str, n: int) -> list:
    with PsgpoRun(url, "uptest") as run:
        run.enqueue("def add(a, b):\n", TESTS, n, {"temperature": 1.0, "max_new_tokens": 12})
        got: list = []
        for batch in run.trajectories("test", batch=8, block_ms=500, idle_timeout_s=90):
            got += list(batch)
            batch.ack()
            if len(got) >= n:
                break
        return got


def _wait(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_up_runs_supervises_stops_and_resumes(tiny_models: Path, tmp_path: Path):
    data = tmp_path / "up"
    proc, url = _start(data, tiny_models)
    try:
        got = _trajectories(url, 2)
        assert sorted(t.sample_index for t in got) == [0, 1]
        assert all(t.HasField("verdict") and len(t.prm_scores) >= 1 for t in got)

        worker = json.loads((data / "up.json").read_text())["pids"]["rollout-0"]
        os.kill(worker, signal.SIGKILL)  # up restarts it; the new worker serves the next task
        assert _wait(lambda: json.loads((data / "up.json").read_text())["pids"]["rollout-0"] != worker)
        assert len(_trajectories(url, 1)) == 1
    finally:
        _stop(proc, data)

    proc, url_again = _start(data, tiny_models)  # same data dir: same Redis port and data (AOF)
    try:
        assert url_again == url
        import redis

        r = redis.Redis.from_url(url)
        assert r.xlen("psgpo:uptest:trajectories") >= 3
        r.close()
    finally:
        _stop(proc, data)


def test_a_data_dir_from_another_version_is_refused_in_one_line(tiny_models: Path, tmp_path: Path):
    data = tmp_path / "old"
    data.mkdir()
    (data / "up.json").write_text(json.dumps({"version": 99}))
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--data-dir", str(data), "--policy",
         str(tiny_models / "policy"), "--no-prm", "--any-ports"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "another version of psgpo" in done.stderr, done.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is gone for our purpose
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_killed_up_leaves_no_service_behind_and_the_next_up_resumes(tiny_models: Path, tmp_path: Path):
    """SIGKILL (no clean stop): the services and workers stop by themselves (parent-death signal); the
    redis-server it left is stopped by the next `up` on the data dir, which then resumes the same data."""
    data = tmp_path / "up"
    proc, url = _start(data, tiny_models)
    assert len(_trajectories(url, 1)) == 1
    layout = json.loads((data / "up.json").read_text())
    proc.kill()
    proc.wait(10)
    assert _wait(lambda: not any(_alive(pid) for pid in layout["pids"].values()), timeout=60), layout["pids"]
    assert _alive(layout["redis_pid"])  # Redis is a plain binary: it does not know its parent died

    proc, url_again = _start(data, tiny_models)
    try:
        assert not _alive(layout["redis_pid"]) and url_again == url  # the stale one stopped, its port reused
        import redis

        r = redis.Redis.from_url(url)
        assert r.xlen("psgpo:uptest:trajectories") >= 1  # the data it held survived (AOF)
        r.close()
    finally:
        _stop(proc, data)
