"""The harness inside a run: loads the program, runs the tests, reports over the result channel.

It runs in the forked child after every isolation layer is on, next to the untrusted program, so it
is written to depend on nothing that program can reach by ordinary means:
- it reports only over its own pipe, in binary frames carrying a per-run random nonce and its pid;
  stdout, stderr and exit codes never decide a verdict, and a test that does not report is failed;
- it uses its own copies of the builtins and C functions captured before the program runs, so
  patching `builtins`, `json`, `os`, `AssertionError` ... changes nothing it does;
- test code sees pristine builtins and shadow copies of common modules, and every value coming out
  of the program is checked and normalised to plain builtin values (`normalize`): an object with a
  rigged `__eq__`, `__bool__` or `__hash__`, or a subclass of a builtin, never reaches a comparison.

What it cannot prevent: code that walks the interpreter itself (frames, `gc`, `/proc/self/mem`)
can in principle find the channel and the nonce. `call` and `stdio` verdicts are immune to that: the
expected values never enter the run, the service compares outside. See docs/sandbox.md.
"""

from __future__ import annotations

import atexit
import builtins
import json
import linecache
import os
import struct
import sys
import threading
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from services.sandbox.frames import (
    CASE,
    COMPILE_ERROR,
    DONE,
    EXIT,
    EXIT_END,
    EXIT_EXCEPTION,
    EXIT_SYSTEM_EXIT,
    HEADER,
    MEMORY,
    MODULE_ERROR,
    SETUP_ERROR,
    TEST,
)
from services.sandbox.rewrite import PreparedTests
from services.sandbox.testruntime import Snapshot, TestFailed, TestRuntime, reset_tracing, shadow_test_modules
from services.sandbox.values import NotPlain, encode, normalize

# Own copies of every builtin: the program may patch the `builtins` module, not this module's dict.
globals().update({k: v for k, v in vars(builtins).items() if not k.startswith("__")})

_write = os.write
_json_loads = json.loads
_getpid = os.getpid
_exit = os._exit
_pack = struct.pack
_format_exception_only = traceback.format_exception_only
_print_exception = traceback.print_exception
_thread_shutdown = threading._shutdown  # what the interpreter does at exit: join non-daemon threads
_run_exitfuncs = atexit._run_exitfuncs
_stdout = sys.__stdout__
_stderr = sys.__stderr__

MAX_TEXT = 4096


# ---------------------------------------------------------------------------------------------- channel


class Channel:
    """Binary frames on the result pipe: length, nonce, kind, index, ok, pid, utf-8 text."""

    def __init__(self, fd: int, nonce: bytes) -> None:
        self.fd = fd
        self.nonce = nonce
        self.pid = _getpid()
        self.memory_frame = self._frame(MEMORY, -1, False, "MemoryError")

    def _frame(self, kind: int, index: int, ok: bool, text: str) -> bytes:
        head = HEADER.pack(kind, index, 1 if ok else 0, self.pid)
        body = self.nonce + head + text.encode("utf-8", "replace")
        return _pack(">I", len(body)) + body

    def send(self, kind: int, index: int = -1, ok: bool = False, text: str = "") -> None:
        if kind == MEMORY:
            data = self.memory_frame
        else:
            data = self._frame(kind, index, ok, text if len(text) <= MAX_TEXT * 64 else text[: MAX_TEXT * 64])
        view = memoryview(data)
        while view:
            try:
                n = _write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # the program closed or replaced the channel: its missing reports fail it
            view = view[n:]


def describe(exc: BaseException) -> str:
    """One line for an exception raised by untrusted code (its __str__ may misbehave: bounded)."""
    if type(exc) in (SyntaxError, IndentationError, TabError) and type(exc.msg) is str:
        return f"{type(exc).__name__}: {exc.msg} (line {exc.lineno})"[:MAX_TEXT]
    try:
        text = "".join(_format_exception_only(type(exc), exc)).strip()
    except BaseException:  # noqa: BLE001 - the program's __str__ can raise anything
        text = "exception (unprintable)"
    if type(text) is not str:
        return "exception"
    text = " ".join(text.split())
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


# ---------------------------------------------------------------------------------------------- values


# ---------------------------------------------------------------------------------------------- runs


@dataclass(slots=True)
class ChildJob:
    mode: str  # "assert" | "humaneval" | "call" | "script"
    code: str
    tests: PreparedTests | None = None
    entry_point: str = ""
    fn: str = ""
    args: list[str] | None = None  # call mode: one JSON array per case, parsed before the program runs
    compiled: Any = None  # the program compiled by the worker (precompile.py); None: the run compiles it


def _compile_program(code: str, filename: str, channel: Channel, compiled: Any = None) -> Any:
    _SOURCE[filename] = code
    if compiled is not None:
        return compiled
    try:
        # dont_inherit: the program gets no __future__ flag of this module (annotations stay evaluated)
        return compile(code, filename, "exec", dont_inherit=True)
    except MemoryError:
        channel.send(MEMORY)
        _finish(1)
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, ValueError (null bytes), RecursionError
        text = describe(exc)
        _print_exception(type(exc), exc, None)
        channel.send(COMPILE_ERROR, -1, False, text)
        _finish(1)


_SOURCE: dict[str, str] = {}


def _print_traceback(exc: BaseException) -> None:
    """The traceback on stderr, without the harness's own frame (with the program's source lines)."""
    for filename, code in _SOURCE.items():
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tb = exc.__traceback__
        _print_exception(type(exc), exc, tb.tb_next if tb is not None else None)
    except BaseException:  # noqa: BLE001 - the program's exception may not even print
        _write(2, b"exception (unprintable)\n")


def _interpreter_exit() -> None:
    """As at a normal interpreter exit: join non-daemon threads, run atexit functions."""
    for step in (_thread_shutdown, _run_exitfuncs):
        try:
            step()
        except BaseException:  # noqa: BLE001, S110 - the program's own shutdown code failed
            pass


def _flush(*streams: Any) -> None:
    for stream in streams:
        try:
            if stream is not None:
                stream.flush()
        except BaseException:  # noqa: BLE001, S110 - a closed stream loses its output, nothing else
            pass


def _finish(code: int) -> NoReturn:
    _flush(_stdout, _stderr)
    _exit(code)


def _load_program(job: ChildJob, channel: Channel) -> dict[Any, Any]:
    program = _compile_program(job.code, "solution.py", channel, job.compiled)
    namespace: dict[Any, Any] = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(program, namespace)
    except MemoryError:
        channel.send(MEMORY)
        _finish(1)
    except BaseException as exc:  # noqa: BLE001 - includes SystemExit: exiting early is an error
        _print_traceback(exc)
        channel.send(MODULE_ERROR, -1, False, describe(exc))
        _finish(1)
    return namespace


def run_tests(job: ChildJob, snapshot: Snapshot, channel: Channel) -> NoReturn:
    assert job.tests is not None
    if job.tests.modules:
        shadow_test_modules(snapshot, job.tests.modules)  # before any program code runs
    program = _load_program(job, channel)
    runtime = TestRuntime(snapshot)
    entry = job.entry_point if job.mode == "humaneval" else None
    if entry is not None and not callable(program.get(entry)):
        channel.send(MODULE_ERROR, -1, False, f"entry point {entry!r} is not defined by the program")
        _finish(1)
    ns = runtime.build(program, entry)
    for step in job.tests.steps:
        _run_step(step.code, step.test_index, ns, channel, runtime)
        runtime.register_test_classes()
    if entry is not None:
        check = ns.get("check")
        if type(check) is not types.FunctionType or check.__globals__ is not ns:
            channel.send(SETUP_ERROR, -1, False, "the test code defines no check(candidate) function")
        else:
            candidate = ns.get(entry)
            _run_step(None, 0, ns, channel, runtime, lambda: check(candidate))
    _finish_with(channel, 0)


def _run_step(
    code: Any,
    index: int,
    ns: dict[str, Any],
    channel: Channel,
    runtime: TestRuntime,
    thunk: Callable[[], Any] | None = None,
) -> None:
    """One top-level statement of the test code (a counted test when index >= 0), reported once."""
    reset_tracing()
    ok = False
    text = ""
    try:
        if thunk is not None:
            thunk()
        else:
            exec(code, ns)
        ok = True
    except TestFailed as exc:
        text = str.__str__(exc.args[0]) if exc.args and type(exc.args[0]) is str else "assertion failed"
    except MemoryError:
        channel.send(MEMORY)
        text = "MemoryError"
    except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt: all fail the test
        text = describe(exc)
    reset_tracing()
    runtime.audit()
    if runtime.tainted:
        ok, text = False, text or runtime.tainted
    if index >= 0:
        channel.send(TEST, index, ok, text)
    elif not ok:
        channel.send(SETUP_ERROR, -1, False, text)


def _finish_with(channel: Channel, code: int) -> NoReturn:
    _flush(_stdout, _stderr)
    channel.send(DONE)
    _exit(code)


def run_call(job: ChildJob, snapshot: Snapshot, channel: Channel) -> NoReturn:
    cases = [_json_loads(text) for text in job.args or []]
    program = _load_program(job, channel)
    fn = program.get(job.fn)
    if not callable(fn):
        channel.send(MODULE_ERROR, -1, False, f"function {job.fn!r} is not defined by the program")
        _finish(1)
    for index, args in enumerate(cases):
        reset_tracing()
        try:
            value = encode(normalize(fn(*args), snapshot.iterator_types))
            channel.send(CASE, index, True, value)
        except MemoryError:
            channel.send(MEMORY)
            channel.send(CASE, index, False, "MemoryError")
        except NotPlain as exc:
            channel.send(CASE, index, False, f"the function returned {exc}")
        except BaseException as exc:  # noqa: BLE001
            channel.send(CASE, index, False, describe(exc))
    _finish_with(channel, 0)


def run_script(job: ChildJob, channel: Channel) -> NoReturn:
    """Run the program as __main__ (stdin is the case input); report how it ended."""
    program = _compile_program(job.code, "solution.py", channel, job.compiled)
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
    sys.argv[:] = ["solution.py"]
    how, code = EXIT_END, 0
    try:
        exec(program, namespace)
    except SystemExit as exc:
        how, code = EXIT_SYSTEM_EXIT, _exit_code(exc)
    except MemoryError:
        channel.send(MEMORY)
        how, code = EXIT_EXCEPTION, 1
        _write(2, b"MemoryError\n")
    except BaseException as exc:  # noqa: BLE001
        how, code = EXIT_EXCEPTION, 1
        _print_traceback(exc)
    if how == EXIT_END:
        _interpreter_exit()
    _flush(getattr(sys, "stdout", None), getattr(sys, "stderr", None), _stdout, _stderr)
    channel.send(EXIT, how, code == 0, str(code))
    _exit(code)


def _exit_code(exc: SystemExit) -> int:
    value = exc.code
    if value is None:
        return 0
    if type(value) is int:
        return value & 0xFF
    try:
        _stderr.write(f"{value}\n")
    except BaseException:  # noqa: BLE001, S110
        pass
    return 1


def run_child(job: ChildJob, snapshot: Snapshot, channel: Channel) -> NoReturn:
    """Entry point in the forked child, after isolation; never returns."""
    if job.mode == "script":
        run_script(job, channel)
    if job.mode == "call":
        run_call(job, snapshot, channel)
    run_tests(job, snapshot, channel)
