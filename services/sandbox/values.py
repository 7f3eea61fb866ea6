"""Program values as the verdict may see them: plain builtin data only.

`normalize` turns what a program returns into exact builtin values (or refuses it with NotPlain):
subclasses of builtins are copied through the base types' own C methods, so no override of
`__eq__`, `__hash__`, `__iter__` ... ever runs in a comparison. `encode` writes such a value as
tagged JSON for the service (verdict.decode), keeping list vs tuple and int vs float apart.

These functions run inside the run, after the program: like the harness they use their own copies
of the builtins.
"""

from __future__ import annotations

import _json
import builtins
from typing import Any

globals().update({k: v for k, v in vars(builtins).items() if not k.startswith("__")})

_encode_str = _json.encode_basestring_ascii
MAX_DEPTH = 100
MAX_ITEMS = 1_000_000
_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis)})
_DICT_VIEWS = {type({}.keys()): "keys", type({}.values()): "values", type({}.items()): "items"}


class NotPlain(Exception):
    """A value that is not made of builtin types: it cannot be trusted in a comparison."""


def normalize(value: Any, iterators: frozenset[type] = frozenset()) -> Any:
    """The value as plain builtin data, or NotPlain. Exact builtin values come back unchanged;
    subclasses of builtins are copied through the base type's own C methods (their overrides never
    run); iterators and generators of `iterators` types are materialised (bounded) as list iterators."""
    if is_exact(value):
        return value
    return _convert(value, {}, set(), iterators)


def is_exact(value: Any) -> bool:
    """Made only of exact builtin types (no subclasses, no other objects), cycles excluded."""
    return _is_exact(value, set(), set())


def _is_exact(value: Any, done: set[int], active: set[int]) -> bool:
    t = type(value)
    if t in _SCALARS:
        return True
    if t not in (list, tuple, dict, set, frozenset, bytearray):
        return False
    key = id(value)
    if key in done:
        return True
    if key in active or len(active) > MAX_DEPTH:
        return False
    if t is bytearray:
        done.add(key)
        return True
    active.add(key)
    if t is dict:
        ok = all(_is_exact(k, done, active) and _is_exact(v, done, active) for k, v in value.items())
    else:
        ok = all(_is_exact(x, done, active) for x in value)
    active.discard(key)
    if ok:
        done.add(key)
    return ok


def _convert(value: Any, memo: dict[int, Any], active: set[int], iterators: frozenset[type]) -> Any:
    t = type(value)
    if t in _SCALARS:
        return value
    key = id(value)
    if key in memo:
        return memo[key]
    if key in active:
        raise NotPlain("a recursive structure")
    if len(active) > MAX_DEPTH:
        raise NotPlain(f"a structure nested deeper than {MAX_DEPTH}")
    active.add(key)
    try:
        out = _convert_one(value, t, memo, active, iterators)
    finally:
        active.discard(key)
    memo[key] = out
    return out


def _convert_one(
    value: Any, t: type, memo: dict[int, Any], active: set[int], iterators: frozenset[type]
) -> Any:
    def conv(x: Any) -> Any:
        return _convert(x, memo, active, iterators)

    if issubclass(t, int):
        return int.__index__(value)
    if issubclass(t, float):
        return float.__float__(value)
    if issubclass(t, complex):
        return complex.__complex__(value)
    if issubclass(t, str):
        return str.__str__(value)
    if issubclass(t, bytes):
        return bytes.__bytes__(value)
    if issubclass(t, bytearray):
        return bytearray(memoryview(value))
    if issubclass(t, list):
        out: list[Any] = []
        memo[id(value)] = out
        out.extend(conv(x) for x in list.__iter__(value))
        return out
    if issubclass(t, tuple):
        return tuple(conv(x) for x in tuple.__iter__(value))
    if issubclass(t, dict):
        result: dict[Any, Any] = {}
        memo[id(value)] = result
        for k, v in dict.items(value):
            result[conv(k)] = conv(v)
        return result
    if issubclass(t, frozenset):
        return frozenset(conv(x) for x in frozenset.__iter__(value))
    if issubclass(t, set):
        return {conv(x) for x in set.__iter__(value)}
    if t in _DICT_VIEWS:
        plain = conv(dict(value.mapping))
        return getattr(plain, _DICT_VIEWS[t])()
    if t in iterators:
        items = []
        for x in value:
            if len(items) >= MAX_ITEMS:
                raise NotPlain(f"an iterator longer than {MAX_ITEMS}")
            items.append(conv(x))
        return iter(items)
    raise NotPlain(f"{_type_name(t)}, not a builtin value")


def _type_name(t: type) -> str:
    try:
        name = type.__dict__["__qualname__"].__get__(t)
    except BaseException:  # noqa: BLE001
        return "an object"
    return f"a {name}" if type(name) is str else "an object"


def encode(value: Any, depth: int = 0) -> str:
    """Tagged JSON for a plain value: int/float/bool/None/str stay JSON scalars, containers are
    ["L"|"T"|"S"|"F"|"D", ...], so list vs tuple and int vs float survive (verdict.decode)."""
    t = type(value)
    if depth > MAX_DEPTH:
        raise NotPlain(f"a structure nested deeper than {MAX_DEPTH}")
    if value is None:
        return "null"
    if t is bool:
        return "true" if value else "false"
    if t is int:
        try:
            return int.__repr__(value)
        except ValueError:  # beyond the decimal digit limit: hexadecimal is unlimited
            return '["I",' + _encode_str(int.__format__(value, "x")) + "]"
    if t is float:
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "Infinity" if value > 0 else "-Infinity"
        return float.__repr__(value)
    if t is str:
        return _encode_str(value)
    if t is list or t is tuple or t is set or t is frozenset:
        tag = {list: "L", tuple: "T", set: "S", frozenset: "F"}[t]
        return '["' + tag + '"' + "".join("," + encode(x, depth + 1) for x in value) + "]"
    if t is dict:
        pairs = (",[" + encode(k, depth + 1) + "," + encode(v, depth + 1) + "]" for k, v in value.items())
        return '["D"' + "".join(pairs) + "]"
    if t is bytes or t is bytearray:
        return '["' + ("B" if t is bytes else "A") + '",' + _encode_str(value.hex()) + "]"
    if t is complex:
        return '["C",' + encode(value.real) + "," + encode(value.imag) + "]"
    if t is range:
        return '["R",' + ",".join(int.__repr__(x) for x in (value.start, value.stop, value.step)) + "]"
    raise NotPlain(f"{_type_name(t)}, not a builtin value")
