"""Trusted preparation of test code (runs in the worker, before any untrusted code exists).

Test code is rewritten so that the verdict does not depend on anything the program under test can
rig:
- every `assert cond` becomes `__psgpo_assert__(cond, "<source>")`: the harness checks the value
  itself (only builtin values count as true), so neither `-O`, nor a patched `AssertionError`, nor
  an object whose `__bool__`/`__eq__` lies can make it pass;
- every call `f(...)` becomes `__psgpo_call__(f, ...)`: results of untrusted callables are checked
  and normalised to plain builtin values before the test sees them (see harness.normalize).

Counting (`tests_total`) is decided here, from the AST, never by the running program:
- `assert` kind: each top-level `assert`, each other top-level statement containing an assert, and
  each top-level call of a test-code function that contains asserts, is one test, run separately;
  test code with none of these is one test that passes when it runs to the end;
- `humaneval` kind: one test, `check(candidate)`, which passes only when it returns normally.

The modules the test code imports by statement are listed too (`PreparedTests.modules`): the run
imports them, and takes its private copies of them, before the program runs (testruntime.py).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

CALL = "__psgpo_call__"
ASSERT = "__psgpo_assert__"
# Calls whose meaning depends on the calling frame; they stay as written (they are trusted builtins).
FRAME_SENSITIVE = frozenset({"super", "locals", "globals", "vars", "dir", "eval", "exec", "breakpoint"})


class InvalidTestCode(ValueError):
    """The test code itself does not parse: a bad request, not a failing program."""


@dataclass(frozen=True, slots=True)
class Step:
    code: object  # a code object (typed loosely: code objects have no importable type name)
    test_index: int  # -1 for setup statements
    label: str  # what a failure message shows


@dataclass(frozen=True, slots=True)
class PreparedTests:
    steps: tuple[Step, ...]
    total: int
    modules: tuple[str, ...] = ()  # absolute imports in the test code, in order (at most MAX_MODULES)


MAX_MODULES = 64


class _Rewriter(ast.NodeTransformer):
    def __init__(self, source: str) -> None:
        self.source = source

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in FRAME_SENSITIVE | {CALL, ASSERT}:
            return node
        call = ast.Call(ast.Name(CALL, ast.Load()), [node.func, *node.args], node.keywords)
        return ast.copy_location(call, node)

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        self.generic_visit(node)
        text = ast.get_source_segment(self.source, node.test) or "assertion"
        call = ast.Call(ast.Name(ASSERT, ast.Load()), [node.test, ast.Constant(_short(text))], [])
        return ast.copy_location(ast.Expr(call), node)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def imported_modules(tree: ast.AST) -> tuple[str, ...]:
    """Module names the code imports by statement, anywhere in it (`import a.b`, `from a.b import c`;
    not relative imports), first occurrence first."""
    names: dict[str, None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(dict.fromkeys(alias.name for alias in node.names))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names[node.module] = None
    names.pop("__future__", None)
    return tuple(names)[:MAX_MODULES]


def _contains_assert(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def _parse(source: str, filename: str) -> ast.Module:
    try:
        return ast.parse(source, filename)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise InvalidTestCode(f"test code does not parse: {type(exc).__name__}: {exc}") from None


def _compile(node: ast.stmt | ast.Module, filename: str) -> object:
    module = node if isinstance(node, ast.Module) else ast.Module([node], [])
    ast.fix_missing_locations(module)
    try:
        return compile(module, filename, "exec", dont_inherit=True)  # not this module's __future__ flags
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise InvalidTestCode(f"test code does not compile: {type(exc).__name__}: {exc}") from None


def prepare_assert_tests(source: str, filename: str = "<tests>") -> PreparedTests:
    tree = _parse(source, filename)
    modules = imported_modules(tree)
    asserting_functions = {
        n.name
        for n in tree.body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and _contains_assert(n)
    }
    rewriter = _Rewriter(source)
    steps: list[Step] = []
    total = 0
    for stmt in tree.body:
        label = _short(ast.get_source_segment(source, stmt) or type(stmt).__name__)
        is_test = _is_test_statement(stmt, asserting_functions)
        new = rewriter.visit(stmt)
        steps.append(Step(_compile(new, filename), total if is_test else -1, label))
        total += int(is_test)
    if total == 0:
        whole = rewriter.visit(_parse(source, filename))
        return PreparedTests((Step(_compile(whole, filename), 0, "test code"),), 1, modules)
    return PreparedTests(tuple(steps), total, modules)


def _is_test_statement(stmt: ast.stmt, asserting_functions: set[str]) -> bool:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return False
    if _contains_assert(stmt):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        func = stmt.value.func
        return isinstance(func, ast.Name) and func.id in asserting_functions
    return False


def prepare_humaneval_tests(source: str, filename: str = "<tests>") -> PreparedTests:
    """The whole test module is setup (defines `check`); the harness then calls check(candidate)."""
    tree = _rewrite_module(source, filename)
    return PreparedTests((Step(_compile(tree, filename), -1, "test code"),), 1, imported_modules(tree))


def _rewrite_module(source: str, filename: str) -> ast.Module:
    tree = _parse(source, filename)
    _Rewriter(source).visit(tree)  # a Module is rewritten in place (only its inner nodes are replaced)
    return tree
