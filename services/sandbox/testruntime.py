"""What rewritten test code calls (rewrite.py), inside the run: the trusted side of the tests.

Program values reach test code in one of two forms:
- plain builtin data (`values.normalize`), compared by the interpreter's own builtin types;
- an `Opaque` proxy, for anything else the program made (its class instances, closures ...): it can
  be passed back to the program, its attributes and methods used (their results are plain data or
  proxies again), its length, items and `str` taken, and `isinstance` works on it; but comparing it,
  taking its truth value, hashing it or doing arithmetic with it fails the test, since the program
  would decide the outcome. Calls into the program also check that the mutable arguments the test
  passed still hold only builtin data afterwards.
Test code itself sees pristine builtins and shadow copies of common modules (take_snapshot in the
worker, shadow_test_modules in the run for the ones it imports that the worker did not preload).
"""

from __future__ import annotations

import builtins
import itertools
import operator
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from services.sandbox.rewrite import ASSERT, CALL
from services.sandbox.values import NotPlain, is_exact, normalize

globals().update({k: v for k, v in vars(builtins).items() if not k.startswith("__")})

_is = operator.is_
_ABSENT = object()  # `get`'s default in the audit: a removed name never matches a pristine value
_settrace = sys.settrace
_setprofile = sys.setprofile
_C_CALLABLES = frozenset(
    {
        types.BuiltinFunctionType,
        types.MethodWrapperType,
        types.WrapperDescriptorType,
        types.MethodDescriptorType,
        types.ClassMethodDescriptorType,
    }
)
_MUTABLE = (list, dict, set, bytearray)


class TestFailed(BaseException):
    """Raised for a failed assert or a forbidden use of a program value. A BaseException, so that
    test code's own `except Exception` does not swallow it."""


@dataclass(slots=True)
class Snapshot:
    """Taken once per worker, before any program runs, and inherited by every run."""

    builtins: dict[str, Any]  # pristine builtins for test code, with a shadow-aware __import__
    shadows: dict[str, types.ModuleType]  # copies of common modules that test code imports
    real_modules: dict[int, types.ModuleType]  # id(real module) -> its shadow
    trusted_ids: frozenset[int]  # functions and classes of the preloaded stdlib modules
    iterator_types: frozenset[type]
    pristine_names: tuple[str, ...]  # `builtins` as taken: names and values, in the same order (audit)
    pristine_values: tuple[Any, ...]


# Modules test code gets as they are, never as private copies (their identity matters more than a
# patch to them could: typing's generics, abc's registries, io's streams ...).
NOT_SHADOWED = frozenset({"io", "types", "weakref", "abc", "contextlib", "queue", "time", "typing", "enum"})
# The standard library's computational modules: when test code imports one the worker did not preload,
# the run copies it before the program runs (shadow_test_modules). Not `sys`, `builtins`, `os` and the
# like: tests assign to them for the program to see (`sys.stdin = io.StringIO(...)`, mocking `input`).
LAZY_SHADOWS = frozenset(
    {
        "array", "base64", "binascii", "bisect", "calendar", "cmath", "collections", "collections.abc",
        "copy", "dataclasses", "datetime", "decimal", "fractions", "functools", "hashlib", "heapq",
        "itertools", "json", "math", "numbers", "operator", "pprint", "random", "re", "statistics",
        "string", "struct", "textwrap", "unicodedata", "zlib",
    }
)  # fmt: skip


def _add_shadows(
    names: list[str],
    shadows: dict[str, types.ModuleType],
    real: dict[int, types.ModuleType],
    trusted: set[int],
    keep: list[object],
) -> None:
    """Private copies of the modules `names` (those imported and not copied yet), and every copy's
    references to a copied module pointed at its copy; the ids of their functions and classes (and
    of the classes' methods) added to `trusted`, the objects to `keep` (ids stay valid only while
    the objects live)."""
    added = []
    for name in names:
        module = sys.modules.get(name)
        if module is None or name in shadows:
            continue
        copy = types.ModuleType(name, getattr(module, "__doc__", None))
        copy.__dict__.update(vars(module))
        shadows[name] = copy
        real[id(module)] = copy
        added.append(module)
    if not added:
        return
    for copy in shadows.values():
        for key, value in list(vars(copy).items()):
            if isinstance(value, types.ModuleType) and id(value) in real:
                setattr(copy, key, real[id(value)])
    for module in added:
        _trust(module, trusted, keep)


def _trust(module: types.ModuleType, trusted: set[int], keep: list[object]) -> None:
    for value in vars(module).values():
        keep.append(value)
        trusted.add(id(value))
        if isinstance(value, type):
            for member in vars(value).values():
                func = getattr(member, "__func__", member)
                keep.append(func)
                trusted.add(id(func))


def take_snapshot(shadow_names: list[str]) -> Snapshot:
    shadows: dict[str, types.ModuleType] = {}
    real: dict[int, types.ModuleType] = {}
    trusted: set[int] = set()
    keep: list[object] = []
    _add_shadows([n for n in shadow_names if n not in NOT_SHADOWED], shadows, real, trusted, keep)
    _trust(builtins, trusted, keep)
    # Fresh, equal copies of the names, made one after the other: a run's audit touches (and so copies)
    # a few pages of them instead of the ~70 pages over which the interned originals are scattered.
    pristine = {name.encode().decode(): value for name, value in vars(builtins).items()}
    real_import = builtins.__import__

    def shadow_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0):
        if level == 0 and name in shadows and (fromlist or "." not in name):
            return shadows[name]  # never sys.modules: the program may have replaced the entry
        module = real_import(name, globals, locals, fromlist, level)
        if level == 0 and not fromlist and name.partition(".")[0] in shadows:
            return shadows[name.partition(".")[0]]
        return real.get(id(module), module)

    pristine["__import__"] = shadow_import
    iterators = {types.GeneratorType, map, filter, zip, enumerate, reversed}
    for sample in ([], (), "", b"", range(0), {}, set(), {}.values(), {}.items(), bytearray()):
        iterators.add(type(iter(sample)))
    iterators.update(v for v in vars(itertools).values() if isinstance(v, type))  # permutations, chain ...
    snapshot = Snapshot(
        pristine,
        shadows,
        real,
        frozenset(trusted),
        frozenset(iterators),
        tuple(pristine),
        tuple(pristine.values()),
    )
    _KEEP.append(keep)
    return snapshot


_KEEP: list[object] = []


def shadow_test_modules(snapshot: Snapshot, names: tuple[str, ...]) -> None:
    """In the run, before the program: import the modules of LAZY_SHADOWS the test code imports that
    the worker did not preload, and take private copies of them (as the worker did of the preloaded
    ones), so that a program patching them changes nothing for the tests. A module that does not
    import is left to the test's own import statement, which reports the error where it always did."""
    wanted: list[str] = []
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in LAZY_SHADOWS and prefix not in snapshot.shadows and prefix not in wanted:
                wanted.append(prefix)
    if not wanted:
        return
    for name in wanted:
        try:
            _import(name)
        except BaseException:  # noqa: BLE001, S112 - the test's own import statement reports it
            continue
    trusted: set[int] = set()
    keep: list[object] = []
    _add_shadows(wanted, snapshot.shadows, snapshot.real_modules, trusted, keep)
    if trusted:
        snapshot.trusted_ids = snapshot.trusted_ids | trusted
        _KEEP.append(keep)


_import = builtins.__import__


# ---------------------------------------------------------------------------------------------- tracing


def _no_tracing(*_args: Any, **_kwargs: Any) -> None:
    raise RuntimeError("tracing and profiling hooks are disabled in the sandbox")


def disable_tracing_hooks() -> None:
    """Line tracing could jump over asserts: the hooks refuse (the harness keeps the originals).
    Called once in the worker; every run inherits it."""
    sys.settrace = _no_tracing
    sys.setprofile = _no_tracing
    threading.settrace = _no_tracing
    threading.setprofile = _no_tracing


def reset_tracing() -> None:
    _settrace(None)
    _setprofile(None)


def _forbidden(name: str) -> Callable[..., Any]:
    def refuse(self: Opaque, *_args: Any) -> Any:
        raise TestFailed(f"the test used `{name}` of a program object: the program would decide it")

    refuse.__name__ = name
    return refuse


class Opaque:
    """A program object as test code sees it (see the module docstring)."""

    __slots__ = ("_psgpo_target", "_psgpo_runtime")

    def __init__(self, target: Any, runtime: TestRuntime) -> None:
        object.__setattr__(self, "_psgpo_target", target)
        object.__setattr__(self, "_psgpo_runtime", runtime)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(proxy, ProgramClass) holds
        return type(self._psgpo_target)

    def __getattr__(self, name: str) -> Any:
        return self._psgpo_runtime.wrap(getattr(self._psgpo_target, name))

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._psgpo_target, name, self._psgpo_runtime.unwrap(value))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._psgpo_runtime.invoke(self._psgpo_target, args, kwargs)

    def __len__(self) -> int:
        return len(self._psgpo_target)

    def __iter__(self) -> Iterator[Any]:
        wrap = self._psgpo_runtime.wrap
        for item in iter(self._psgpo_target):
            yield wrap(item)

    def __getitem__(self, key: Any) -> Any:
        return self._psgpo_runtime.wrap(self._psgpo_target[self._psgpo_runtime.unwrap(key)])

    def __contains__(self, item: Any) -> bool:
        return self._psgpo_runtime.unwrap(item) in self._psgpo_target

    def __str__(self) -> str:
        return str.__str__(str(self._psgpo_target))

    def __repr__(self) -> str:
        return str.__str__(repr(self._psgpo_target))

    def __format__(self, spec: str) -> str:
        return str.__str__(format(self._psgpo_target, spec))


_FORBIDDEN = (
    "eq ne lt le gt ge bool hash add radd sub rsub mul rmul truediv rtruediv floordiv rfloordiv mod rmod "
    "divmod rdivmod pow rpow lshift rlshift rshift rrshift and rand or ror xor rxor matmul rmatmul neg pos "
    "abs invert index int float complex round trunc floor ceil"
)
for _name in _FORBIDDEN.split():
    setattr(Opaque, f"__{_name}__", _forbidden(f"__{_name}__"))


class TestRuntime:
    """The functions that rewritten test code calls, bound to one run's test namespace."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.namespace: dict[str, Any] = {}
        self.guarded: set[int] = set()
        self.test_classes: set[int] = set()
        self.proxies = False  # any Opaque handed out: arguments need unwrapping
        self.tainted = ""  # why the test data can no longer be trusted (then no assert holds)
        self.originals: dict[int, Any] = {}  # id(guard wrapper) -> the program's own callable
        self.hooks: tuple[Any, Any] = (None, None)  # the exact objects test code reaches as CALL, ASSERT

    # ---------------------------------------------------------------------------------------------- values

    def wrap(self, value: Any) -> Any:
        """A program value for test code: plain builtin data, or an Opaque proxy."""
        try:
            return normalize(value, self.snapshot.iterator_types)
        except NotPlain:
            self.proxies = True
            return Opaque(value, self)

    def unwrap(self, value: Any) -> Any:
        """What the program gets back for a value from test code: proxies become their objects again
        (in lists and dicts in place, so that the program's mutations stay visible to the test)."""
        t = type(value)
        if t is Opaque:
            return object.__getattribute__(value, "_psgpo_target")
        if t is types.FunctionType and id(value) in self.originals:
            return self.originals[id(value)]  # never hand the program the sandbox's own wrapper
        if not self.proxies:
            return value
        if t is list:
            for index, item in enumerate(value):
                if type(item) is Opaque:
                    value[index] = object.__getattribute__(item, "_psgpo_target")
        elif t is tuple and any(type(item) is Opaque for item in value):
            return tuple(self.unwrap(item) for item in value)
        elif t is dict:
            for key, item in list(value.items()):
                if type(item) is Opaque:
                    value[key] = object.__getattribute__(item, "_psgpo_target")
        return value

    def invoke(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call into the program: unwrap proxies, check that plain mutable arguments stay plain (a
        program could put rigged objects into a list the test then compares), check that the test
        namespace is intact (a callback from the test code leads the program to it), wrap the result."""
        args = tuple(self.unwrap(a) for a in args)
        kwargs = {k: self.unwrap(v) for k, v in kwargs.items()}
        passed = (*args, *kwargs.values())
        watched = [a for a in passed if type(a) in _MUTABLE and is_exact(a)]
        before = dict(self.namespace) if any(self._reaches_tests(a) for a in passed) else None
        result = fn(*args, **kwargs)
        reset_tracing()
        for argument in watched:
            if not is_exact(argument):
                self.taint("the program put a non-builtin value into an argument of the test")
        ns = self.namespace
        if (ns.get(CALL), ns.get(ASSERT)) != self.hooks or ns.get(
            "__builtins__"
        ) is not self.snapshot.builtins:
            self.taint("the program changed the test code's namespace")
        if before is not None and (
            before.keys() != ns.keys() or any(ns[k] is not v for k, v in before.items())
        ):
            self.taint("the program changed the test code's namespace")
        return self.wrap(result)

    def _reaches_tests(self, value: Any) -> bool:
        """Whether the program can reach the test namespace from `value` (plainly, by __globals__)."""
        t = type(value)
        if t is types.FunctionType:
            return value.__globals__ is self.namespace
        if t is types.MethodType:
            return self._reaches_tests(value.__func__) or self._reaches_tests(value.__self__)
        if t in (list, tuple, dict, set, frozenset):
            items = value.values() if t is dict else value
            return any(type(x) is not int and type(x) is not str and self._reaches_tests(x) for x in items)
        return id(t) in self.test_classes

    def taint(self, why: str) -> None:
        """The test data or code is no longer trustworthy: this and every later assert fails."""
        self.tainted = self.tainted or why
        raise TestFailed(why)

    def audit(self) -> None:
        """After each step: the pristine builtins test code uses must be exactly as they were (same
        names, each bound to the very same object; compared in C, against tuples the worker built once,
        so a run neither rebuilds them nor runs a Python loop per name)."""
        snapshot = self.snapshot
        builtins_now = snapshot.builtins
        names, values = snapshot.pristine_names, snapshot.pristine_values
        if len(builtins_now) != len(names) or not all(
            map(_is, map(builtins_now.get, names, itertools.repeat(_ABSENT)), values)
        ):
            builtins_now.clear()
            builtins_now.update(zip(names, values, strict=True))
            self.tainted = self.tainted or "the program changed the builtins of the test code"

    # ---------------------------------------------------------------------------------------------- calls

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A callable of the program as test code sees it: every call goes through invoke."""
        runtime = self

        def guarded(*args: Any, **kwargs: Any) -> Any:
            return runtime.invoke(fn, args, kwargs)

        self.originals[id(guarded)] = fn
        try:
            guarded.__name__ = guarded.__qualname__ = str.__str__(fn.__name__)
        except BaseException:  # noqa: BLE001 - a callable object without a plain __name__
            pass
        self.guarded.add(id(guarded))
        _KEEP.append(guarded)
        return guarded

    def call(self, f: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Every call in test code (rewrite.CALL): trusted callables directly, the program's through
        invoke (classes of the program included: their instances come back as proxies)."""
        t = type(f)
        if t is Opaque or t in _C_CALLABLES or id(f) in self.snapshot.trusted_ids or id(f) in self.guarded:
            return f(*args, **kwargs)
        if t is types.FunctionType and f.__globals__ is self.namespace:
            return f(*args, **kwargs)
        if t is types.MethodType and type(f.__func__) is types.FunctionType:
            if f.__func__.__globals__ is self.namespace:
                return f(*args, **kwargs)
        if issubclass(t, type) and self._test_class(f):
            return f(*args, **kwargs)
        return self.invoke(f, args, kwargs)

    def _test_class(self, cls: type) -> bool:
        """Defined by the test code: registered after each setup step, or with a method of its own."""
        if id(cls) in self.test_classes:
            return True
        for member in type.__dict__["__dict__"].__get__(cls).values():
            if type(member) is types.FunctionType and member.__globals__ is self.namespace:
                return True
        return False

    def register_test_classes(self) -> None:
        for value in list(self.namespace.values()):
            if isinstance(value, type) and id(value) not in self.program_ids:
                self.test_classes.add(id(value))
                _KEEP.append(value)

    def check(self, condition: Any, text: str) -> None:
        """A rewritten `assert`: only builtin values are true or false here."""
        if self.tainted:
            raise TestFailed(f"assert {text}: {self.tainted}")
        if type(condition) is not bool:
            if type(condition) is Opaque:
                raise TestFailed(f"assert {text}: the condition is a program object")
            try:
                condition = bool(normalize(condition, self.snapshot.iterator_types))
            except NotPlain as exc:
                raise TestFailed(f"assert {text}: the condition is {exc}") from None
        if condition is not True:
            raise TestFailed(f"assert {text}")

    # ---------------------------------------------------------------------------------------------- namespace

    def build(self, program: dict[Any, Any], entry_point: str | None) -> dict[str, Any]:
        snapshot = self.snapshot
        self.hooks = (self.call, self.check)  # bound once: the namespace must keep these very objects
        ns: dict[str, Any] = {"__builtins__": snapshot.builtins, "__name__": "__tests__"}
        ns[CALL], ns[ASSERT] = self.hooks
        self.program_ids: set[int] = set()
        for name, value in list(dict.items(program)):
            if type(name) is not str or name.startswith("__"):
                continue
            if name in snapshot.builtins and name != entry_point:
                continue  # the program may not redefine what test code calls `abs` or `sorted`
            self.program_ids.add(id(value))
            ns[name] = self._expose(value)
        self.namespace = ns
        return ns

    def _expose(self, value: Any) -> Any:
        t = type(value)
        if t is types.ModuleType:
            return self.snapshot.real_modules.get(id(value), value)
        if issubclass(t, type):
            return value  # a class stays a class (isinstance works); calling it goes through call()
        if is_exact(value):
            return value
        if callable(value):
            return self.guard(value)
        return self.wrap(value)
