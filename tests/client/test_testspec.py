"""The test shapes the SDK and the adapters accept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from psgpo.v1 import sandbox_pb2
from services.client.testspec import parse_tests, to_proto
from services.sandbox.model import AssertTests, CallCase, CallTests, HumanEvalTests, StdioCase, StdioTests

CHECK = "def check(candidate):\n    assert candidate(1) == 2\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("assert f(1) == 2", AssertTests("assert f(1) == 2")),
        (["assert f(1) == 2", "assert f(2) == 3\n"], AssertTests("assert f(1) == 2\nassert f(2) == 3\n")),
        ({"kind": "assert", "code": "assert g()"}, AssertTests("assert g()")),
        ({"asserts": ["assert a", "assert b"]}, AssertTests("assert a\nassert b\n")),
        (
            {"test_list": ["assert f(1) == 2"], "test_setup_code": "import math"},
            AssertTests("import math\nassert f(1) == 2\n"),
        ),
        ({"test_list": np.array(["assert f(1) == 2"], dtype=object)}, AssertTests("assert f(1) == 2\n")),
        ({"test": CHECK, "entry_point": "f"}, HumanEvalTests(CHECK, "f")),
        (  # a row of a struct column mixing shapes: the keys this row lacks are None
            {"test": None, "entry_point": None, "test_list": ["assert f(1) == 2"], "test_setup_code": None},
            AssertTests("assert f(1) == 2\n"),
        ),
        (json.dumps({"kind": "humaneval", "test": CHECK, "entry_point": "f"}), HumanEvalTests(CHECK, "f")),
        ({"inputs": ["1\n"], "outputs": ["2\n"]}, StdioTests((StdioCase("1\n", "2\n"),))),
        ({"cases": [{"stdin": "", "stdout": "hi"}]}, StdioTests((StdioCase("", "hi"),))),
        (
            {"inputs": np.array([[1, 2], [3, 4]]), "outputs": np.array([3, 7]), "fn_name": "add"},
            CallTests("add", (CallCase([1, 2], 3), CallCase([3, 4], 7))),
        ),
        (
            {"kind": "call", "fn": "f", "cases": [{"args": [[1], {"k": 2}], "expected": None}]},
            CallTests("f", (CallCase([[1], {"k": 2}], None),)),
        ),
        (
            sandbox_pb2.TestSpec(
                stdio=sandbox_pb2.StdioTests(cases=[sandbox_pb2.StdioCase(stdin="a", stdout="b")])
            ),
            StdioTests((StdioCase("a", "b"),)),
        ),
        (AssertTests("assert 1"), AssertTests("assert 1")),
    ],
)
def test_accepted_shapes(value: object, expected: object) -> None:
    assert parse_tests(value) == expected


def test_call_cases_survive_the_proto_as_json() -> None:
    spec = to_proto({"inputs": [[1, 2.5]], "outputs": [3.5], "fn_name": "add"})
    assert spec.WhichOneof("kind") == "call" and spec.call.fn == "add"
    assert json.loads(spec.call.cases[0].args_json) == [1, 2.5] and spec.call.cases[0].expected_json == "3.5"
    assert parse_tests(spec) == CallTests("add", (CallCase([1, 2.5], 3.5),))
    proto = sandbox_pb2.TestSpec(assert_tests=sandbox_pb2.AssertTests(code="assert 1"))
    copy = to_proto(proto)
    assert copy == proto and copy is not proto


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("", "empty string"),
        ("{not json", "not valid JSON"),
        ({"answer": "4"}, "unrecognised mapping"),
        ({"kind": "pytest"}, "unknown kind"),
        ({"inputs": ["1"], "outputs": []}, "1 inputs but 0 outputs"),
        ({"cases": [{"stdin": "1"}]}, "stdin"),
        ({"test_list": []}, "empty"),
        ({"kind": "call", "fn": "f", "cases": [{"args": 1, "expected": 2}]}, "must be a list"),
        (sandbox_pb2.TestSpec(), "no test kind"),
        (None, "got NoneType"),
        (42, "got int"),
    ],
)
def test_refused_shapes(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_tests(value)
