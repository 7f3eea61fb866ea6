"""What the worker does once for speed: the warm-up through the harness, and CPU pinning."""

from __future__ import annotations

import linecache
import os
import sys

from services.sandbox import harness, testruntime, warmup
from services.sandbox.executor import parse_frames
from services.sandbox.frames import CASE, DONE, EXIT, EXIT_END, MODULE_ERROR, TEST
from services.sandbox.pool import pin_plan


def _frames(rounds: int) -> tuple[int, list[tuple[int, int, bool, str]]]:
    read, write = os.pipe()
    try:
        finished = warmup.warm_up(testruntime.take_snapshot(["json", "re", "math"]), rounds, write)
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    frames, tampered = parse_frames(data, warmup.NONCE, os.getpid())
    assert tampered == ""
    return finished, frames


def test_warm_up_takes_every_path_it_is_meant_to():
    """Passing and failing tests, a program failing on load, call cases, a script reading stdin: each
    canned job reaches the harness's end (or its error exit), every round."""
    finished, frames = _frames(rounds=2)
    assert finished == 2 * len(warmup.jobs())
    kinds = [kind for kind, *_ in frames]
    assert kinds.count(DONE) == 2 * 4  # every job but the broken program and the script
    tests = [(index, ok) for kind, index, ok, _ in frames if kind == TEST]
    assert (0, True) in tests and (5, False) in tests  # the assert job's last test fails on purpose
    assert any(kind == MODULE_ERROR and "ValueError" in text for kind, _, _, text in frames)
    cases = [(index, ok) for kind, index, ok, _ in frames if kind == CASE]
    assert (0, True) in cases and (2, False) in cases  # pairs("x") raises TypeError
    assert (EXIT, EXIT_END, True, "0") in frames


def test_warm_up_leaves_no_trace_in_the_process():
    streams = (sys.stdin, sys.stdout, sys.stderr)
    argv = list(sys.argv)
    _frames(rounds=1)
    assert harness._exit is os._exit
    assert harness._thread_shutdown is not warmup._nothing
    assert harness._run_exitfuncs is not warmup._nothing
    assert (sys.stdin, sys.stdout, sys.stderr) == streams
    assert all(a is b for a, b in zip((sys.stdin, sys.stdout, sys.stderr), streams, strict=True))
    assert sys.argv == argv
    assert harness._SOURCE == {}
    assert testruntime._KEEP == []
    assert "solution.py" not in linecache.cache
    assert sys.gettrace() is None


def test_pin_plan_one_cpu_per_worker_only_with_as_many_workers_as_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    assert pin_plan(len(cpus)) == cpus
    assert pin_plan(len(cpus) + 1) == []
    if len(cpus) > 1:
        assert pin_plan(len(cpus) - 1) == []  # a share of a bigger machine: never pile onto CPU 0


def test_workers_and_their_runs_are_pinned(sandbox):
    plan = pin_plan(len(sandbox.core.pool.handles))
    for handle in sandbox.core.pool.handles.values():
        expected = {plan[handle.slot]} if plan else os.sched_getaffinity(0)
        assert os.sched_getaffinity(handle.pid) == expected
    if plan:
        result = sandbox.run("import os\nprint(sorted(os.sched_getaffinity(0)))\n")
        assert result.stdout.strip() in {f"[{cpu}]" for cpu in plan}, result


def test_a_cpu_gone_from_the_set_does_not_stop_a_worker(monkeypatch):
    """The plan is made once; a worker (re)started after its CPU left the cgroup's set runs unpinned."""
    from services.sandbox import pool
    from services.sandbox.client import AssertTests, SandboxClient
    from tests.sandbox.conftest import start_sandbox

    monkeypatch.setattr(pool, "pin_plan", lambda workers: [100_000 + slot for slot in range(workers)])
    running = start_sandbox(workers=2)
    try:
        with SandboxClient(f"http://127.0.0.1:{running.http_port}") as client:
            code = "import os\nprint(len(os.sched_getaffinity(0)))\n"
            result = client.run(code, AssertTests("assert True\n"))
        assert result.passed and result.stdout.strip() == str(len(os.sched_getaffinity(0))), result
    finally:
        running.stop()
