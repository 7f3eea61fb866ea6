"""The worker compiles the program before the fork (precompile.py): runs behave exactly as when the
run compiles it, and the cases the worker's compile must not decide fall back to the run."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

from services.sandbox import harness, precompile
from services.sandbox.client import (
    AssertTests,
    CallCase,
    CallTests,
    HumanEvalTests,
    SandboxClient,
    StdioCase,
    StdioTests,
)
from services.sandbox.frames import EXIT
from services.sandbox.harness import ChildJob
from tests.sandbox.conftest import Sandbox, start_sandbox


def test_precompile_gives_the_code_object_the_run_would_compile():
    code = precompile.precompile("def f(x):\n    return x + 1\n")
    assert code is not None and code.co_filename == "solution.py" == precompile.FILENAME
    namespace: dict[str, object] = {}
    exec(code, namespace)
    assert namespace["f"](1) == 2  # type: ignore[operator]


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("def f(:\n    return 1\n", id="syntax-error"),
        pytest.param("x = 1\0\n", id="null-byte"),
        pytest.param("x = 1\nassert (x, 'always true')\n", id="syntax-warning"),
        pytest.param("y = 2 is 2\n", id="literal-is-warning"),
        pytest.param("x = 1\n" * (precompile.MAX_CHARS // 6 + 1), id="too-long"),
        pytest.param("x = " + "(" * 250 + "1" + ")" * 250 + "\n", id="too-deeply-nested"),
    ],
)
def test_what_the_worker_does_not_compile(source: str):
    """Errors, warnings and long sources: None, so the run compiles and reports them itself."""
    filters = list(warnings.filters)
    assert precompile.precompile(source) is None
    assert warnings.filters == filters  # the worker's own warning filters are left as they were


def test_the_harness_runs_the_precompiled_code():
    """A job carrying a code object runs that object (the source is kept for tracebacks only)."""
    compiled = compile("print('precompiled')", "solution.py", "exec")
    job = ChildJob("script", "print('compiled by the run')\n", compiled=compiled)
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child ends in os._exit
        try:
            os.dup2(out_w, 1)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - pytest captured the original
            harness.run_script(job, harness.Channel(res_w, bytes(16)))
        finally:
            os._exit(3)
    os.close(out_w)
    os.close(res_w)
    with os.fdopen(out_r, "rb") as out, os.fdopen(res_r, "rb") as res:
        stdout, frames = out.read(), res.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0 and stdout == b"precompiled\n" and frames
    assert frames[4 + 16 : 4 + 16 + 1] == bytes([EXIT])  # an EXIT frame: length, nonce, kind


PROGRAMS = [
    ("def add(a, b):\n    return a + b\n", HumanEvalTests("def check(c):\n    assert c(1, 2) == 3\n", "add")),
    ("def add(a, b):\n    return a - b\n", HumanEvalTests("def check(c):\n    assert c(1, 2) == 3\n", "add")),
    ("x = 1\n\ndef f():\n    return x\n\nraise ValueError('at load')\n", AssertTests("assert f() == 1\n")),
    ("def f(:\n    return 1\n", AssertTests("assert f() == 1\n")),
    ("x = 1\nassert (x, 'always true')\ndef f():\n    return x\n", AssertTests("assert f() == 1\n")),
    (
        "from __future__ import annotations\n\ndef f(x: NotDefinedAnywhere) -> int:\n    return 1\n",
        AssertTests("assert f(0) == 1\n"),
    ),
    (
        "import sys\ndef where():\n    return sys._getframe().f_code.co_filename\n",
        CallTests("where", (CallCase([], "solution.py"), CallCase([], "other.py"))),
    ),
    (
        "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n",
        StdioTests((StdioCase("1 2\n", "3\n"), StdioCase("5\n", "6\n"))),
    ),
    ("def f(x):\n    return 1 / x\n", AssertTests("assert f(1) == 1\nassert f(0) == 1\n")),
]


@pytest.fixture(scope="module")
def without_precompile() -> SandboxClient:
    running = start_sandbox(workers=1, precompile=False)
    client = SandboxClient(f"http://127.0.0.1:{running.http_port}", timeout_s=60.0)
    yield client
    client.close()
    running.stop()


@pytest.mark.parametrize("index", range(len(PROGRAMS)))
def test_runs_are_the_same_with_and_without_precompile(sandbox: Sandbox, without_precompile, index: int):
    code, tests = PROGRAMS[index]
    assert sandbox.core.settings.precompile
    on = sandbox.client.run(code, tests, 10.0)
    off = without_precompile.run(code, tests, 10.0)
    seen = ("status", "passed", "tests_passed", "tests_total", "detail", "stdout", "stderr")
    assert {k: getattr(on, k) for k in seen} == {k: getattr(off, k) for k in seen}
