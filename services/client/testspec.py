"""The unit-test shapes the SDK and the framework adapters accept, turned into the sandbox's own
dataclasses (`services.sandbox.model`) or the `psgpo.v1.TestSpec` proto.

`parse_tests(value)` accepts, in this order:

- a sandbox dataclass (`AssertTests`, `HumanEvalTests`, `StdioTests`, `CallTests`): as is;
- a `psgpo.v1.TestSpec` proto;
- a string: JSON object text (`{...}`) is parsed and read as a mapping (below); any other text is
  MBPP-style assert statements (`"assert f(1) == 2\\nassert f(2) == 3"`);
- a list of strings: MBPP's `test_list`, one assert statement each;
- a mapping, one of
  - `{"kind": "assert", "code": str}`, `{"kind": "humaneval", "test": str, "entry_point": str}`,
    `{"kind": "stdio", "cases": [{"stdin": str, "stdout": str}]}`,
    `{"kind": "call", "fn": str, "cases": [{"args": list, "expected": any}]}`: the sandbox's HTTP
    shapes (DESIGN.md);
  - `{"test": str, "entry_point": str}`: HumanEval;
  - `{"test_list": [str], "test_setup_code": str (optional)}`: an MBPP row;
  - `{"asserts": str | [str]}`: assert statements;
  - `{"inputs": [str], "outputs": [str]}`: stdio cases, the APPS/TACO/verl `input_output` shape;
    with `"fn_name": str` they are call cases instead (`inputs[i]` is the argument list of call i,
    `outputs[i]` its expected value, compared by exact type and value);
  - `{"cases": [{"stdin", "stdout"}]}` (stdio) or `{"fn": str, "cases": [{"args", "expected"}]}`
    (call) without `kind`.

Anything else is a ValueError that names the accepted shapes. Lists may also be NumPy arrays or
tuples (a parquet row read back by pandas holds arrays), and keys whose value is None are ignored
(a struct column of mixed shapes fills the keys a row lacks with None).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from psgpo.v1 import sandbox_pb2
from services.common.errors import RequestError
from services.sandbox.convert import request_to_pb, tests_from_pb
from services.sandbox.model import (
    AssertTests,
    CallCase,
    CallTests,
    HumanEvalTests,
    RunRequest,
    StdioCase,
    StdioTests,
    TestSpec,
)

__all__ = ["SHAPES", "TestSpec", "TestsLike", "parse_tests", "to_proto"]

# What a caller may pass; Any because JSON text, mappings and array-likes are all accepted.
TestsLike = TestSpec | sandbox_pb2.TestSpec | str | Mapping[str, Any] | Any

SHAPES = (
    "a sandbox dataclass (AssertTests, HumanEvalTests, StdioTests, CallTests), a psgpo.v1.TestSpec, "
    "MBPP assert statements (a string or a list of strings), JSON text of a mapping, or a mapping: "
    '{"kind": "assert"|"humaneval"|"stdio"|"call", ...}, {"test", "entry_point"}, '
    '{"test_list", "test_setup_code"?}, {"asserts"}, {"inputs", "outputs", "fn_name"?}, '
    '{"cases": [{"stdin", "stdout"}]} or {"fn", "cases": [{"args", "expected"}]}'
)

_SANDBOX_TYPES = (AssertTests, HumanEvalTests, StdioTests, CallTests)


def _list(value: Any, where: str) -> list[Any]:
    """A plain list from a list, tuple or array-like (NumPy arrays from parquet rows)."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise ValueError(f"tests: {where} must be a list, got {type(value).__name__}")
    return list(value)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"tests: {where} must be a string, got {type(value).__name__}")
    return value


def _asserts(lines: Any, where: str, setup: str = "") -> AssertTests:
    statements = [_str(s, f"{where}[{i}]") for i, s in enumerate(_list(lines, where))]
    if not statements:
        raise ValueError(f"tests: {where} is empty")
    code = "\n".join(s.rstrip("\n") for s in statements) + "\n"
    return AssertTests((setup.rstrip("\n") + "\n" + code) if setup.strip() else code)


def _stdio(cases: Any, where: str) -> StdioTests:
    out = []
    for i, case in enumerate(_list(cases, where)):
        if not isinstance(case, Mapping) or "stdin" not in case or "stdout" not in case:
            raise ValueError(f'tests: {where}[{i}] must be {{"stdin": str, "stdout": str}}')
        out.append(
            StdioCase(
                _str(case["stdin"], f"{where}[{i}].stdin"), _str(case["stdout"], f"{where}[{i}].stdout")
            )
        )
    if not out:
        raise ValueError(f"tests: {where} is empty")
    return StdioTests(tuple(out))


def _plain(value: Any) -> Any:
    """JSON-like Python values, recursively (array-likes and NumPy scalars from parquet rows become
    lists and Python numbers)."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _call(fn: Any, cases: Any, where: str) -> CallTests:
    out = []
    for i, case in enumerate(_list(cases, where)):
        if not isinstance(case, Mapping) or "args" not in case or "expected" not in case:
            raise ValueError(f'tests: {where}[{i}] must be {{"args": list, "expected": any}}')
        out.append(CallCase(_plain(_list(case["args"], f"{where}[{i}].args")), _plain(case["expected"])))
    if not out:
        raise ValueError(f"tests: {where} is empty")
    return CallTests(_str(fn, "fn"), tuple(out))


def _from_mapping(spec: Mapping[str, Any]) -> TestSpec:
    # A datasets/parquet struct column holds every key of every row, None where a row has none.
    spec = {key: value for key, value in spec.items() if value is not None}
    kind = spec.get("kind")
    if kind is not None:
        if kind == "assert":
            return AssertTests(_str(spec.get("code"), "code"))
        if kind == "humaneval":
            return HumanEvalTests(
                _str(spec.get("test"), "test"), _str(spec.get("entry_point"), "entry_point")
            )
        if kind == "stdio":
            return _stdio(spec.get("cases"), "cases")
        if kind == "call":
            return _call(spec.get("fn"), spec.get("cases"), "cases")
        raise ValueError(f"tests: unknown kind {kind!r} (assert, humaneval, stdio, call)")
    if "test" in spec and "entry_point" in spec:
        return HumanEvalTests(_str(spec["test"], "test"), _str(spec["entry_point"], "entry_point"))
    if "test_list" in spec:
        return _asserts(
            spec["test_list"], "test_list", _str(spec.get("test_setup_code") or "", "test_setup_code")
        )
    if "asserts" in spec:
        asserts = spec["asserts"]
        return AssertTests(asserts) if isinstance(asserts, str) else _asserts(asserts, "asserts")
    if "inputs" in spec and "outputs" in spec:
        inputs, outputs = _list(spec["inputs"], "inputs"), _list(spec["outputs"], "outputs")
        if len(inputs) != len(outputs):
            raise ValueError(f"tests: {len(inputs)} inputs but {len(outputs)} outputs")
        if spec.get("fn_name"):
            cases = [{"args": a, "expected": e} for a, e in zip(inputs, outputs, strict=True)]
            return _call(spec["fn_name"], cases, "inputs")
        return _stdio([{"stdin": i, "stdout": o} for i, o in zip(inputs, outputs, strict=True)], "inputs")
    if "cases" in spec:
        return _call(spec["fn"], spec["cases"], "cases") if "fn" in spec else _stdio(spec["cases"], "cases")
    raise ValueError(f"tests: unrecognised mapping with keys {sorted(map(str, spec))}; expected {SHAPES}")


def parse_tests(value: TestsLike) -> TestSpec:
    """The sandbox dataclass for `value` (see the module docstring); ValueError if it is none of them."""
    if isinstance(value, _SANDBOX_TYPES):
        return value
    if isinstance(value, sandbox_pb2.TestSpec):
        try:
            return tests_from_pb(value)
        except RequestError as error:
            raise ValueError(str(error)) from None
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("tests: empty string")
        if value.lstrip().startswith("{"):
            try:
                decoded = json.loads(value)
            except ValueError as error:
                raise ValueError(f"tests: text starting with '{{' is not valid JSON: {error}") from None
            if not isinstance(decoded, Mapping):
                raise ValueError("tests: JSON text must hold an object")
            return _from_mapping(decoded)
        return AssertTests(value)
    if isinstance(value, Mapping):
        return _from_mapping(value)
    if value is not None and (isinstance(value, list | tuple) or hasattr(value, "tolist")):
        return _asserts(value, "test list")
    raise ValueError(f"tests: got {type(value).__name__}; expected {SHAPES}")


def to_proto(value: TestsLike) -> sandbox_pb2.TestSpec:
    """The `psgpo.v1.TestSpec` for anything `parse_tests` accepts (a proto is copied as is)."""
    if isinstance(value, sandbox_pb2.TestSpec):
        parse_tests(value)  # refuse an empty or malformed spec here, not in a worker
        copy = sandbox_pb2.TestSpec()
        copy.CopyFrom(value)
        return copy
    return request_to_pb(RunRequest("", parse_tests(value))).tests
