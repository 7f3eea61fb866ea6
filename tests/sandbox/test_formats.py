"""The four test formats through the real service: verdicts, per-test counts, error reporting."""

from __future__ import annotations

from services.sandbox.client import (
    AssertTests,
    CallCase,
    CallTests,
    HumanEvalTests,
    RunRequest,
    Status,
    StdioCase,
    StdioTests,
)
from tests.sandbox.conftest import Sandbox

MBPP_CODE = "def square(x):\n    return x * x if x != 3 else 10\n"
MBPP_TESTS = "assert square(2) == 4\nassert square(3) == 9\nassert square(4) == 16\n"


def test_assert_counts_each_assert_separately(sandbox: Sandbox):
    result = sandbox.run(MBPP_CODE, AssertTests(MBPP_TESTS))
    assert (result.status, result.tests_passed, result.tests_total) == (Status.FAILED, 2, 3)
    assert "test 1 failed" in result.detail and "square(3) == 9" in result.detail


def test_assert_with_setup_helpers_and_loops(sandbox: Sandbox):
    tests = (
        "import math\n"
        "CASES = [(1, 1), (2, 4)]\n"
        "def close(a, b):\n"
        "    return math.isclose(a, b)\n"
        "for x, y in CASES:\n"
        "    assert square(x) == y\n"
        "assert close(square(1.5), 2.25)\n"
        "def check_big():\n"
        "    assert square(100) == 10000\n"
        "check_big()\n"
    )
    result = sandbox.run("def square(x):\n    return x * x\n", AssertTests(tests))
    assert result.passed and result.tests_total == 3, result


def test_assert_without_asserts_is_one_test(sandbox: Sandbox):
    result = sandbox.run("def f():\n    return 1\n", AssertTests("f()\n"))
    assert result.passed and result.tests_total == 1


def test_program_classes_can_be_used_by_tests(sandbox: Sandbox):
    code = (
        "class Pair:\n"
        "    def __init__(self, a, b):\n"
        "        self.a, self.b = a, b\n"
        "def longest(pairs):\n"
        "    return max(p.b - p.a for p in pairs)\n"
    )
    result = sandbox.run(code, AssertTests("assert longest([Pair(1, 5), Pair(2, 3)]) == 4\n"))
    assert result.passed, result


def test_generators_and_containers_of_builtins_are_fine(sandbox: Sandbox):
    code = (
        "from collections import Counter, OrderedDict, namedtuple\n"
        "P = namedtuple('P', 'x y')\n"
        "def gen(n):\n"
        "    yield from range(n)\n"
        "def counts(s):\n"
        "    return Counter(s)\n"
        "def point():\n"
        "    return P(1, 2)\n"
    )
    tests = (
        "assert list(gen(3)) == [0, 1, 2]\n"
        "assert counts('aab') == {'a': 2, 'b': 1}\n"
        "assert point() == (1, 2)\n"
    )
    result = sandbox.run(code, AssertTests(tests))
    assert result.passed and result.tests_total == 3, result


def test_humaneval_is_one_test_that_must_complete(sandbox: Sandbox):
    test = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 3\n"
    good = sandbox.run("def inc(x):\n    return x + 1\n", HumanEvalTests(test, "inc"))
    assert (good.status, good.tests_passed, good.tests_total) == (Status.PASSED, 1, 1)
    bad = sandbox.run("def inc(x):\n    return 2\n", HumanEvalTests(test, "inc"))
    assert (bad.status, bad.tests_passed, bad.tests_total) == (Status.FAILED, 0, 1)
    missing = sandbox.run("def other(x):\n    return x + 1\n", HumanEvalTests(test, "inc"))
    assert missing.status is Status.ERROR and "inc" in missing.detail


def test_humaneval_tests_may_use_helpers_from_the_prompt(sandbox: Sandbox):
    code = "def encode(s):\n    return s[::-1]\ndef decode(s):\n    return s[::-1]\n"
    test = "def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n"
    assert sandbox.run(code, HumanEvalTests(test, "decode")).passed


def test_syntax_errors_are_reported(sandbox: Sandbox):
    result = sandbox.run("def f(:\n    return 1\n", AssertTests("assert f() == 1\n"))
    assert result.status is Status.ERROR and "SyntaxError" in result.detail and "line 1" in result.detail
    assert result.tests_total == 1 and result.tests_passed == 0


def test_exceptions_while_loading_are_errors(sandbox: Sandbox):
    result = sandbox.run("raise ValueError('boom')\n", AssertTests("assert True\n"))
    assert result.status is Status.ERROR and "ValueError: boom" in result.detail
    assert "solution.py" in result.stderr and "harness" not in result.stderr


def test_bad_test_code_is_an_error_not_a_failure(sandbox: Sandbox):
    result = sandbox.run("x = 1\n", AssertTests("assert x ==\n"))
    assert result.status is Status.ERROR and "test code" in result.detail


def test_stdio_whitespace_tolerant_and_stdin_buffer(sandbox: Sandbox):
    code = "import sys\nnums = list(map(int, sys.stdin.buffer.read().split()))\nprint(*nums[::-1])\nprint()\n"
    tests = StdioTests((StdioCase("1 2 3\n", "3  2 1"), StdioCase("4\n5\n", "5\n4\n\n\n")))
    result = sandbox.run(code, tests)
    assert result.passed and result.tests_total == 2, result


def test_stdio_input_and_main_guard(sandbox: Sandbox):
    code = (
        "def main():\n"
        "    a, b = map(int, input().split())\n"
        "    print(a + b)\n"
        "if __name__ == '__main__':\n"
        "    main()\n"
    )
    tests = StdioTests((StdioCase("1 2\n", "3"), StdioCase("2 2\n", "5"), StdioCase("x\n", "0")))
    result = sandbox.run(code, tests)
    assert (result.status, result.tests_passed, result.tests_total) == (Status.FAILED, 1, 3)
    assert "case 1: wrong answer" in result.detail


def test_stdio_runtime_error_and_exit_codes(sandbox: Sandbox):
    result = sandbox.run("import sys\nprint(1)\nsys.exit(3)\n", StdioTests((StdioCase("", "1"),)))
    assert result.status is Status.FAILED and "exit code 3" in result.detail
    early = sandbox.run("import sys\nprint(1)\nsys.exit()\nprint(2)\n", StdioTests((StdioCase("", "1"),)))
    assert early.passed  # a judge compares output: exiting once the answer is printed is fine


def test_stdio_threads_are_joined_like_at_interpreter_exit(sandbox: Sandbox):
    code = (
        "import threading, time\n"
        "def work():\n"
        "    time.sleep(0.05)\n"
        "    print(42)\n"
        "threading.Thread(target=work).start()\n"
    )
    assert sandbox.run(code, StdioTests((StdioCase("", "42"),))).passed


def test_call_compares_type_and_value(sandbox: Sandbox):
    code = (
        "def f(x):\n"
        "    return {'int': 2, 'float': 2.0, 'bool': True, 'tuple': (1, 2), 'list': [1, 2],\n"
        "            'none': None, 'nested': {'a': [1.0000000001, {'b': 'c'}]}, 'big': 10**30}[x]\n"
    )
    cases = [
        (["int"], 2, True),
        (["int"], 2.0, False),
        (["float"], 2.0, True),
        (["float"], 2, False),
        (["bool"], True, True),
        (["bool"], 1, False),
        (["tuple"], [1, 2], True),
        (["list"], [1, 2], True),
        (["none"], None, True),
        (["nested"], {"a": [1.0, {"b": "c"}]}, True),
        (["nested"], {"a": [1.0, {"b": "d"}]}, False),
        (["big"], 10**30, True),
    ]
    results = sandbox.client.run_batch(
        [RunRequest(code, CallTests("f", (CallCase(args, expected),))) for args, expected, _ in cases]
    )
    assert [r.passed for r in results] == [ok for _, _, ok in cases], [r.detail for r in results]


def test_call_counts_cases_and_reports_exceptions(sandbox: Sandbox):
    code = "def div(a, b):\n    return a / b\n"
    tests = CallTests("div", (CallCase([1, 2], 0.5), CallCase([1, 0], 0.0), CallCase([3, 3], 1.0)))
    result = sandbox.run(code, tests)
    assert (result.status, result.tests_passed, result.tests_total) == (Status.FAILED, 2, 3)
    assert "ZeroDivisionError" in result.detail
    missing = sandbox.run("x = 1\n", tests)
    assert missing.status is Status.ERROR and "div" in missing.detail


def test_float_tolerance_in_call(sandbox: Sandbox):
    code = "def third():\n    return 1 / 3\n"
    assert sandbox.run(code, CallTests("third", (CallCase([], 0.3333333),))).passed
    assert not sandbox.run(code, CallTests("third", (CallCase([], 0.3334),))).passed


def test_private_temp_dir_is_writable_and_fresh(sandbox: Sandbox):
    code = (
        "import os, tempfile\n"
        "assert os.listdir('.') == []\n"
        "open('notes.txt', 'w').write('x')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'y')\n"
        "def ok():\n"
        "    return True\n"
    )
    for _ in range(2):  # the second run must not see the first run's file
        assert sandbox.run(code, AssertTests("assert ok()\n")).passed
    sandbox.assert_clean()


def test_common_modules_are_preloaded_and_importable(sandbox: Sandbox):
    code = "import fractions, decimal, heapq, bisect, statistics, itertools, functools, re, json, typing\n"
    code += "def half():\n    return statistics.mean([0, 1])\n"
    tests = "import fractions\nassert fractions.Fraction(1, 2) == 0.5 == half()\n"
    assert sandbox.run(code, AssertTests(tests + "assert heapq.nsmallest(1, [2, 1]) == [1]\n")).passed
    missing = sandbox.run(
        "x = 1\n", AssertTests("import no_such_module_psgpo\nassert no_such_module_psgpo.x == x\n")
    )
    assert missing.status is Status.FAILED and "no_such_module_psgpo" in missing.detail, missing
    # what tests assign to in sys and builtins, the program sees (they are never private copies)
    reader = "def double():\n    return 2 * int(input())\n"
    stdin = "import io, sys\nsys.stdin = io.StringIO('21\\n')\nassert double() == 42\n"
    assert sandbox.run(reader, AssertTests(stdin)).passed
    mocked = "import builtins\nbuiltins.input = lambda *a: '5'\nassert double() == 10\n"
    assert sandbox.run(reader, AssertTests(mocked)).passed
    blocked = sandbox.run("import ctypes\n", AssertTests("assert True\n"))
    assert blocked.status is Status.ERROR and "ctypes" in blocked.detail


def test_program_and_tests_compile_as_plain_python_not_with_the_harness_future_flags(sandbox: Sandbox):
    # The harness modules use `from __future__ import annotations`; compile() would hand that flag to the
    # program and the tests unless told not to, and annotations would silently become strings.
    code = "def f(x: int) -> int:\n    return x\nKIND = f.__annotations__['x']\n"
    tests = "def g(y: float):\n    pass\nassert KIND is int\nassert g.__annotations__['y'] is float\n"
    result = sandbox.run(code, AssertTests(tests))
    assert result.passed and result.tests_total == 2, result
    script = sandbox.run(
        "def f(x: int):\n    pass\nprint(f.__annotations__['x'] is int)\n",
        StdioTests([StdioCase("", "True\n")]),
    )
    assert script.passed, script
