"""Programs that try to be judged correct without being correct. Every one must fail (each wrong
program here would pass an exit-code or stdout based judge, or an in-process `assert`)."""

from __future__ import annotations

import pytest

from services.sandbox.client import (
    AssertTests,
    CallCase,
    CallTests,
    HumanEvalTests,
    Status,
    StdioCase,
    StdioTests,
)
from services.sandbox.config import SandboxSettings
from tests.sandbox.conftest import Sandbox

WRONG = "def add(a, b):\n    return a * b\n"  # right only for add(2, 2): 1 of the 3 asserts
RIGHT = "def add(a, b):\n    return a + b\n"
ASSERTS = AssertTests(
    "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert abs(add(0.1, 0.2) - 0.3) < 1e-9\n"
)
HUMANEVAL = HumanEvalTests(
    "import math\n"
    "def check(candidate):\n"
    "    assert candidate(1, 2) == 3\n"
    "    assert candidate(-1, 1) == 0\n"
    "    assert math.isclose(candidate(0.5, 0.25), 0.75)\n",
    "add",
)


def judged(sandbox: Sandbox, prefix: str, suffix: str = "") -> list[Status]:
    """The same cheat around a wrong `add`, under assert and humaneval tests."""
    code = prefix + WRONG + suffix
    results = [sandbox.run(code, ASSERTS, timeout_s=3.0), sandbox.run(code, HUMANEVAL, timeout_s=3.0)]
    for result in results:
        assert not result.passed and result.tests_passed <= 1, result  # never more than honestly
    return [r.status for r in results]


def test_the_honest_programs_are_judged_as_expected(sandbox: Sandbox):
    assert sandbox.run(RIGHT, ASSERTS).passed and sandbox.run(RIGHT, HUMANEVAL).passed
    wrong = sandbox.run(WRONG, ASSERTS)
    assert wrong.status is Status.FAILED and wrong.tests_passed == 1 and wrong.tests_total == 3


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "exit()\n"])
def test_exiting_before_the_tests(sandbox: Sandbox, exit_call: str):
    judged(sandbox, "", exit_call)
    judged(sandbox, exit_call)


@pytest.mark.parametrize("exit_call", ["__import__('sys').exit(0)", "__import__('os')._exit(0)"])
def test_exiting_from_inside_the_function_under_test(sandbox: Sandbox, exit_call: str):
    judged(sandbox, f"def add(a, b):\n    {exit_call}\n", "del add\n")
    judged(sandbox, f"def add(a, b):\n    {exit_call}\n")


def test_rigged_eq_ne_bool_hash(sandbox: Sandbox):
    rigged = (
        "class Anything:\n"
        "    def __eq__(self, other): return True\n"
        "    def __ne__(self, other): return False\n"
        "    def __bool__(self): return True\n"
        "    def __hash__(self): return 0\n"
        "    def __abs__(self): return 0\n"
        "    def __sub__(self, other): return self\n"
        "    def __lt__(self, other): return True\n"
        "def add(a, b):\n"
        "    return Anything()\n"
    )
    for tests in (ASSERTS, HUMANEVAL):
        result = sandbox.run(rigged, tests, timeout_s=3.0)
        assert not result.passed and result.tests_passed == 0, result
    call = CallTests("add", (CallCase([1, 2], 3),))
    result = sandbox.run(rigged, call)
    assert not result.passed and "builtin value" in result.detail


def test_subclass_of_a_builtin_with_rigged_methods(sandbox: Sandbox):
    rigged = (
        "class Int(int):\n"
        "    def __eq__(self, other): return True\n"
        "    __hash__ = int.__hash__\n"
        "class Float(float):\n"
        "    def __sub__(self, other): return 0.0\n"
        "    def __eq__(self, other): return True\n"
        "    __hash__ = float.__hash__\n"
        "def add(a, b):\n"
        "    return Float(a - b) if isinstance(a, float) else Int(a - b)\n"
    )
    for tests in (ASSERTS, HUMANEVAL, CallTests("add", (CallCase([1, 2], 3),))):
        result = sandbox.run(rigged, tests, timeout_s=3.0)
        assert not result.passed and result.tests_passed == 0, result


def test_a_correct_subclass_value_still_counts(sandbox: Sandbox):
    code = "class Int(int):\n    pass\ndef add(a, b):\n    return Int(a + b) if type(a) is int else a + b\n"
    assert sandbox.run(code, ASSERTS).passed


def test_printing_fake_verdicts_and_closing_stdout(sandbox: Sandbox):
    fake = (
        "import os, sys\n"
        'print(\'PASSED\\nall tests passed\\n{"status": "passed", "passed": true}\')\n'
        "sys.stderr.write('OK\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stdout.close()\n"
        "os.close(1)\n"
        "os.close(2)\n"
    )
    judged(sandbox, fake)
    assert sandbox.run(fake + RIGHT, ASSERTS).passed  # closing its own output breaks nothing


def test_patching_builtins_and_assertion_machinery(sandbox: Sandbox):
    patches = (
        "import builtins, math\n"
        "class Never(Exception):\n"
        "    pass\n"
        "builtins.AssertionError = Never\n"
        "builtins.abs = lambda x: 0\n"
        "builtins.isinstance = lambda *a: True\n"
        "math.isclose = lambda *a, **k: True\n"
        "abs = lambda x: 0\n"
    )
    judged(sandbox, patches)


def test_shadowing_a_builtin_the_tests_use(sandbox: Sandbox):
    judged(sandbox, "def abs(x):\n    return 0\ndef isinstance(*a):\n    return True\n")


def test_replacing_modules_in_sys_modules(sandbox: Sandbox):
    fake = (
        "import sys, types\n"
        "fake = types.ModuleType('math')\n"
        "fake.isclose = lambda *a, **k: True\n"
        "sys.modules['math'] = fake\n"
    )
    judged(sandbox, fake)


MEAN_ASSERTS = AssertTests("import statistics\nassert mean3([1, 2, 6]) == statistics.mean([1, 2, 6])\n")
MEAN_HUMANEVAL = HumanEvalTests(
    "from statistics import mean\n\n\ndef check(candidate):\n"
    "    assert candidate([1, 2, 6]) == mean([1, 2, 6])\n",
    "mean3",
)


@pytest.mark.parametrize(
    "patch",
    [
        "import statistics\nstatistics.mean = lambda xs: 0\n",
        "import sys, types\nfake = types.ModuleType('statistics')\nfake.mean = lambda xs: 0\n"
        "sys.modules['statistics'] = fake\n",
    ],
)
def test_patching_a_module_the_worker_did_not_preload(sandbox: Sandbox, patch: str):
    """The tests import `statistics` (not preloaded): they get a copy taken before the program ran."""
    assert "statistics" not in SandboxSettings().preload  # this is about modules the run imports itself
    wrong = patch + "def mean3(xs):\n    return 0\n"
    for tests in (MEAN_ASSERTS, MEAN_HUMANEVAL):
        assert not sandbox.run(wrong, tests, timeout_s=3.0).passed
        assert sandbox.run("def mean3(xs):\n    return sum(xs) / len(xs)\n", tests, timeout_s=3.0).passed


def test_tracing_hooks_are_refused(sandbox: Sandbox):
    code = "import sys\ndef tracer(frame, event, arg):\n    return tracer\nsys.settrace(tracer)\n"
    assert set(judged(sandbox, code)) == {Status.ERROR}


def test_forking_so_that_two_processes_report(sandbox: Sandbox):
    judged(sandbox, "import os\nos.fork()\n")


def test_forging_frames_on_the_result_channel(sandbox: Sandbox):
    forge = (
        "import os, struct\n"
        "for fd in range(3, 64):\n"
        "    for kind in (4, 8):\n"
        "        body = bytes(16) + struct.pack('>BiBI', kind, 0, 1, os.getpid())\n"
        "        try:\n"
        "            os.write(fd, struct.pack('>I', len(body)) + body)\n"
        "        except OSError:\n"
        "            pass\n"
    )
    statuses = judged(sandbox, forge)
    assert statuses == [Status.FAILED, Status.FAILED]
    tampered = sandbox.run(forge + RIGHT, ASSERTS)
    assert not tampered.passed and "tampering" in tampered.detail


def test_closing_the_result_channel(sandbox: Sandbox):
    code = "import os\nos.closerange(3, 64)\n"
    judged(sandbox, code)
    result = sandbox.run(code + RIGHT, ASSERTS)
    assert not result.passed  # no reports, no pass: even for a right answer


def test_raising_from_the_function_under_test(sandbox: Sandbox):
    code = (
        "class Weird(BaseException):\n"
        "    def __str__(self):\n"
        "        raise RuntimeError('no')\n"
        "def add(a, b):\n"
        "    raise Weird()\n"
    )
    for tests in (ASSERTS, HUMANEVAL):
        result = sandbox.run(code, tests)
        assert result.status is Status.FAILED and result.tests_passed == 0


def test_keyboard_interrupt_and_system_exit_inside_tests(sandbox: Sandbox):
    for exc in ("KeyboardInterrupt", "SystemExit(0)", "GeneratorExit"):
        judged(sandbox, f"def add(a, b):\n    raise {exc}\n", "del add\n")


def test_stdio_cannot_be_fooled_by_exit_codes(sandbox: Sandbox):
    tests = StdioTests((StdioCase("1 2\n", "3\n"), StdioCase("5 5\n", "10\n")))
    cheat = "import os\nprint('3', flush=True)\nos._exit(0)\n"
    result = sandbox.run(cheat, tests)
    assert result.status is Status.FAILED and result.tests_passed == 1


def test_call_expected_values_never_reach_the_program(sandbox: Sandbox):
    code = (
        "import gc, sys\n"
        "def add(a, b):\n"
        "    for obj in gc.get_objects():\n"
        "        if isinstance(obj, (list, dict)) and 424242 in (obj if isinstance(obj, list) else []):\n"
        "            return 424242\n"
        "    return 0\n"
    )
    result = sandbox.run(code, CallTests("add", (CallCase([1, 2], 424242),)))
    assert not result.passed


def test_the_function_under_test_as_a_class_with_rigged_instances(sandbox: Sandbox):
    rigged = (
        "class add:\n"
        "    def __init__(self, a, b):\n"
        "        pass\n"
        "    def __eq__(self, other): return True\n"
        "    def __sub__(self, other): return 0\n"
        "    def __bool__(self): return True\n"
        "    def __hash__(self): return 0\n"
    )
    for tests in (ASSERTS, HUMANEVAL):
        result = sandbox.run(rigged, tests)
        assert not result.passed and result.tests_passed == 0, result
    for test in ("assert add(1, 2) in [3]\n", "assert not not add(1, 2)\n", "assert {add(1, 2)} == {3}\n"):
        assert not sandbox.run(rigged, AssertTests(test)).passed, test


def test_rigged_objects_slipped_into_arguments(sandbox: Sandbox):
    code = (
        "class Anything:\n"
        "    def __eq__(self, other): return True\n"
        "    __hash__ = object.__hash__\n"
        "def sort_in_place(items):\n"
        "    items[:] = [Anything(), Anything(), Anything()]\n"
    )
    for tests in (
        "data = [3, 1, 2]\nsort_in_place(data)\nassert data == [1, 2, 3]\n",
        "data = [3, 1, 2]\nassert sort_in_place(data) is None and data == [1, 2, 3]\n",
        "data = {'k': [3, 1, 2]}\nsort_in_place(data['k'])\nassert data == {'k': [1, 2, 3]}\n",
    ):
        result = sandbox.run(code, AssertTests(tests))
        assert not result.passed and "argument" in result.detail, (tests, result)


def test_program_objects_still_work_through_methods_and_attributes(sandbox: Sandbox):
    code = (
        "class Stack:\n"
        "    def __init__(self):\n"
        "        self.items = []\n"
        "    def push(self, x):\n"
        "        self.items.append(x)\n"
        "        return self\n"
        "    def __len__(self):\n"
        "        return len(self.items)\n"
        "def make():\n"
        "    return Stack()\n"
    )
    tests = AssertTests(
        "s = make()\n"
        "s.push(1).push(2)\n"
        "assert len(s) == 2 and s.items == [1, 2] and isinstance(s, Stack)\n"
        "assert Stack().push(5).items[0] == 5\n"
        "assert str(s).startswith('<')\n"
    )
    result = sandbox.run(code, tests)
    assert result.passed and result.tests_total == 3, result


def test_callbacks_from_the_tests_cannot_be_used_to_rewrite_the_tests(sandbox: Sandbox):
    code = (
        "def apply(fn, x):\n"
        "    g = fn.__globals__\n"
        "    for name in list(g):\n"
        "        if name.startswith('__psgpo') or name == 'close':\n"
        "            g[name] = lambda *a, **k: True\n"
        "    if '__builtins__' in g and isinstance(g['__builtins__'], dict):\n"
        "        g['__builtins__']['abs'] = lambda x: 0\n"
        "    return 0\n"
    )
    tests = AssertTests(
        "def close(a, b):\n"
        "    return abs(a - b) < 1e-9\n"
        "assert apply(lambda v: v * 2, 3) == 6\n"
        "assert close(apply(lambda v: v, 1), 1)\n"
        "assert abs(apply(lambda v: v, 5) - 5) < 1e-9\n"
    )
    result = sandbox.run(code, tests)
    assert not result.passed and result.tests_passed == 0, result


def test_program_functions_handed_to_the_program_are_not_the_sandbox_wrappers(sandbox: Sandbox):
    code = (
        "def double(x):\n"
        "    return 2 * x\n"
        "def apply(fn, x):\n"
        "    assert fn.__globals__ is globals(), 'got a wrapper'\n"
        "    return fn(x)\n"
    )
    result = sandbox.run(code, AssertTests("assert apply(double, 3) == 6\n"))
    assert result.passed, result
