"""The after-fork watch in C (csrc/watch.c) and in Python (executor.py) decide the same: the same
programs, hostile ones included, through a service of each kind, compared result by result."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.sandbox import native
from services.sandbox.client import AssertTests, SandboxClient, Status, StdioCase, StdioTests
from tests.sandbox.conftest import Sandbox, start_sandbox

NOT_BUILT = "the C watch is not built (no C compiler when `make setup` ran): only the Python one is here"

TRIVIAL = AssertTests("assert True\n")
TWO = AssertTests("assert f(1) == 2\nassert f(2) == 3\n")
DAEMON = (
    "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        while True:\n"
    "            time.sleep(0.1)\n    os._exit(0)\ntime.sleep(0.2)\ndef f():\n    return 1\n"
)
DEAF = "import signal, time\nsignal.signal(15, signal.SIG_IGN)\ntime.sleep(1000)\n"
SUM = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.stderr.write('note\\n')\n"
SUMS = StdioTests([StdioCase("1 2 3\n", "6\n"), StdioCase("4 5\n", "10\n")])


def flood(fd: int) -> str:
    return f"import os\nwhile True:\n    os.write({fd}, b'x' * 65536)\n"


PROGRAMS: list[tuple[str, str, object, float, Status]] = [
    ("pass", "def f(x):\n    return x + 1\n", TWO, 3.0, Status.PASSED),
    ("fail", "def f(x):\n    return 2\n", TWO, 3.0, Status.FAILED),
    ("raise", "raise ValueError('no')\n", TRIVIAL, 3.0, Status.ERROR),
    ("loop", "while True:\n    pass\n", TRIVIAL, 1.0, Status.TIMEOUT),
    ("deaf sleep", DEAF, TRIVIAL, 1.0, Status.TIMEOUT),
    ("stdout flood", flood(1), TRIVIAL, 5.0, Status.OUTPUT_LIMIT),
    ("stderr flood", flood(2), TRIVIAL, 5.0, Status.OUTPUT_LIMIT),
    ("result flood", flood(3), TRIVIAL, 5.0, Status.OUTPUT_LIMIT),
    ("double-fork daemon", DAEMON, AssertTests("assert f() == 1\n"), 3.0, Status.PASSED),
    ("kill own group", "import os, signal\nos.killpg(0, signal.SIGKILL)\n", TRIVIAL, 3.0, Status.FAILED),
    ("stdio", SUM, SUMS, 3.0, Status.FAILED),
    (
        "exit code",
        "print('out')\nraise SystemExit(3)\n",
        StdioTests([StdioCase("", "out\n")]),
        3.0,
        Status.FAILED,
    ),
]


@pytest.fixture(scope="module")
def python_watch() -> Iterator[Sandbox]:
    running = start_sandbox(workers=1, native_watch=False)
    client = SandboxClient(f"http://127.0.0.1:{running.http_port}", timeout_s=60.0)
    yield Sandbox(running, client)
    client.close()
    running.stop()


def test_each_service_says_how_it_watches(sandbox: Sandbox, python_watch: Sandbox):
    assert python_watch.client.info()["watch"] == ["Python (SANDBOX_NATIVE_WATCH is off)"]
    watches = sandbox.client.info()["watch"]
    if not native.LIBRARY.exists():
        pytest.skip(NOT_BUILT)
    assert watches == ["C (libpsgpo_watch.so)"] * len(watches), watches


@pytest.mark.parametrize("name", [p[0] for p in PROGRAMS])
def test_the_c_and_the_python_watch_agree(sandbox: Sandbox, python_watch: Sandbox, name: str):
    if not native.LIBRARY.exists():
        pytest.skip(NOT_BUILT)
    _, code, tests, timeout_s, expected = next(p for p in PROGRAMS if p[0] == name)
    results = [s.client.run(code, tests, timeout_s) for s in (sandbox, python_watch)]  # type: ignore[arg-type]
    for result, service in zip(results, (sandbox, python_watch), strict=True):
        assert result.status is expected, result
        service.assert_clean()
    c, py = results
    assert (c.status, c.tests_passed, c.tests_total) == (py.status, py.tests_passed, py.tests_total)
    assert (len(c.stdout), len(c.stderr)) == (len(py.stdout), len(py.stderr))
    if c.status is not Status.OUTPUT_LIMIT:  # a flood is cut at the cap: same length, any bytes
        assert (c.stdout, c.stderr) == (py.stdout, py.stderr)


def test_build_reports_a_missing_or_failing_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(native, "LIBRARY", tmp_path / "libpsgpo_watch.so")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    with pytest.raises(RuntimeError, match="no C compiler"):
        native.build()
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: nothing compiles here' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeError, match="nothing compiles here"):
        native.build(str(failing))
    assert not (tmp_path / "libpsgpo_watch.so").exists()
    watch, why = native.load((10, 10, 10))
    assert watch is None and why.startswith("Python (not built")


def test_build_compiles_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    compiler = next((p for p in ("/usr/bin/cc", "/usr/bin/gcc") if os.access(p, os.X_OK)), None)
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(native, "LIBRARY", tmp_path / "libpsgpo_watch.so")
    assert native.build(compiler).startswith("built ")
    assert native.build(compiler).startswith("up to date")
    watch, why = native.load((10, 10, 10))
    assert watch is not None and why == "C (libpsgpo_watch.so)"
