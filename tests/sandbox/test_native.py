"""The runner in C (csrc/runner.c: fork, isolation, watch) and the Python one (executor.py) decide the
same: the same programs, hostile ones included, through a service of each kind, result by result."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.sandbox import native
from services.sandbox.client import AssertTests, SandboxClient, Status, StdioCase, StdioTests
from services.sandbox.config import SandboxSettings
from tests.sandbox.conftest import Sandbox, start_sandbox

NOT_BUILT = "the C runner is not built (no C compiler when `make setup` ran): only the Python one is here"

TRIVIAL = AssertTests("assert True\n")
TWO = AssertTests("assert f(1) == 2\nassert f(2) == 3\n")
DAEMON = (
    "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        while True:\n"
    "            time.sleep(0.1)\n    os._exit(0)\ntime.sleep(0.2)\ndef f():\n    return 1\n"
)
DEAF = "import signal, time\nsignal.signal(15, signal.SIG_IGN)\ntime.sleep(1000)\n"
SUM = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.stderr.write('note\\n')\n"
SUMS = StdioTests([StdioCase("1 2 3\n", "6\n"), StdioCase("4 5\n", "10\n")])


CAP = SandboxSettings().output_limit_bytes  # both services below run with the default


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
    ("stdout at its cap", f"import os\nos.write(1, b'a' * {CAP})\n", TRIVIAL, 5.0, Status.PASSED),
    ("stdout a byte over", f"import os\nos.write(1, b'a' * {CAP + 1})\n", TRIVIAL, 5.0, Status.OUTPUT_LIMIT),
    (
        "stdout closed, then a hang",
        "import os\nos.close(1)\nwhile True:\n    pass\n",
        TRIVIAL,
        1.0,
        Status.TIMEOUT,
    ),
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
def python_runner() -> Iterator[Sandbox]:
    running = start_sandbox(workers=1, native_runner=False)
    client = SandboxClient(f"http://127.0.0.1:{running.http_port}", timeout_s=60.0)
    yield Sandbox(running, client)
    client.close()
    running.stop()


def test_each_service_says_how_it_runs(sandbox: Sandbox, python_runner: Sandbox):
    assert python_runner.client.info()["runner"] == ["Python (SANDBOX_NATIVE_RUNNER is off)"]
    runners = sandbox.client.info()["runner"]
    if not native.LIBRARY.exists():
        pytest.skip(NOT_BUILT)
    assert runners == ["C (libpsgpo_runner.so)"] * len(runners), runners


@pytest.mark.parametrize("name", [p[0] for p in PROGRAMS])
def test_the_c_and_the_python_runner_agree(sandbox: Sandbox, python_runner: Sandbox, name: str):
    if not native.LIBRARY.exists():
        pytest.skip(NOT_BUILT)
    _, code, tests, timeout_s, expected = next(p for p in PROGRAMS if p[0] == name)
    results = [s.client.run(code, tests, timeout_s) for s in (sandbox, python_runner)]  # type: ignore[arg-type]
    for result, service in zip(results, (sandbox, python_runner), strict=True):
        assert result.status is expected, result
        service.assert_clean()
    c, py = results
    assert (c.status, c.tests_passed, c.tests_total) == (py.status, py.tests_passed, py.tests_total)
    assert (len(c.stdout), len(c.stderr)) == (len(py.stdout), len(py.stderr))
    if c.status is not Status.OUTPUT_LIMIT:  # a flood is cut at the cap: same length, any bytes
        assert (c.stdout, c.stderr) == (py.stdout, py.stderr)


def test_build_reports_a_missing_or_failing_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(native, "LIBRARY", tmp_path / "libpsgpo_runner.so")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    with pytest.raises(RuntimeError, match="no C compiler"):
        native.build()
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: nothing compiles here' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeError, match="nothing compiles here"):
        native.build(str(failing))
    assert not (tmp_path / "libpsgpo_runner.so").exists()
    runner, why = native.load((10, 10, 10))
    assert runner is None and why.startswith("Python (not built")


def test_build_compiles_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    compiler = next((p for p in ("/usr/bin/cc", "/usr/bin/gcc") if os.access(p, os.X_OK)), None)
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(native, "LIBRARY", tmp_path / "libpsgpo_runner.so")
    assert native.build(compiler).startswith("built ")
    assert native.build(compiler).startswith("up to date")
    runner, why = native.load((10, 10, 10))
    assert runner is not None and why == "C (libpsgpo_runner.so)"


def _loaded() -> native.NativeRunner:
    if not native.LIBRARY.exists():
        pytest.skip(NOT_BUILT)
    runner, why = native.load((1024, 1024, 1024))
    assert runner is not None, why
    return runner


# Run in a fresh interpreter: the child goes back into Python after the fork, which is only safe in a
# single-threaded process (as the worker is); pytest here holds service threads that may own the GIL.
ISOLATION_PROBE = """
import os, resource, sys
from services.sandbox import native

runner, why = native.load((1024, 1024, 1024))
assert runner is not None, why
stdin_r, stdin_w = os.pipe()
out_r, out_w = os.pipe()
err_r, err_w = os.pipe()
res_r, res_w = os.pipe()
stray = os.open(os.devnull, os.O_RDONLY)  # inheritable: only the C code's close_range shuts it
os.write(stdin_w, b"in")
os.close(stdin_w)
fds = (stdin_r, out_w, err_w, res_w)
pid = runner.fork_run(fds, os.fsencode(sys.argv[1]), 1 << 40, 7, -1, -1, os.getpid())
if pid == 0:  # the isolated child: report and leave at once
    try:
        report = [os.getsid(0) == os.getpid(), os.getcwd(), resource.getrlimit(resource.RLIMIT_CPU)]
        report += [os.read(0, 2).decode(), sorted(int(fd) for fd in os.listdir("/proc/self/fd"))]
        os.write(3, repr(report).encode())
    finally:
        os._exit(0)
for fd in (stdin_r, out_w, err_w, res_w, stray):
    os.close(fd)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), os.read(res_r, 4096).decode())
"""


def test_the_c_runner_isolates_the_child_before_it_returns(tmp_path: Path):
    """In the child: its own session, the run dir, the rlimits, the pipes on 0-3 and nothing else open."""
    _loaded()
    probe = subprocess.run(
        [sys.executable, "-c", ISOLATION_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=native.SOURCE.parents[3],
    )
    assert probe.returncode == 0, probe.stderr
    code, _, report = probe.stdout.strip().partition(" ")
    assert code == "0", probe.stdout
    own_session, cwd, cpu, stdin, fds = ast.literal_eval(report)
    assert own_session and cwd == str(tmp_path) and cpu == (7, 8) and stdin == "in"
    assert fds[:4] == [0, 1, 2, 3] and len(fds) == 5  # 0-3 and the fd listdir itself opened


def test_the_c_runner_reports_a_failed_step_and_exits_125(tmp_path: Path):
    runner = _loaded()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    missing = os.fsencode(tmp_path / "no" / "such" / "dir")
    # The child never returns to Python here (the chdir fails inside the C code), so forking pytest's
    # multi-threaded process is safe.
    pid = runner.fork_run((out_r, out_w, err_w, out_w), missing, 1 << 40, 5, -1, -1, os.getpid())
    if pid == 0:  # only if chdir somehow worked
        os._exit(99)
    os.close(err_w)
    _, status = os.waitpid(pid, 0)
    message = os.read(err_r, 4096).decode()
    for fd in (out_r, out_w, err_r):
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 125
    assert message == "sandbox setup failed: chdir to the run dir: No such file or directory\n", message
