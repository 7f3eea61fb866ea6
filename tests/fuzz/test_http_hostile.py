"""Hostile input at the HTTP edge beyond what the schema describes: raw bytes, arbitrary JSON (NaN,
huge numbers, deep nesting), schema-shaped requests with hostile values, odd content types, garbage
on the raw socket, and clients that send half a request and stall. Properties: never a 5xx, never a
hang, error bodies are one line, the service still answers a good request afterwards."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.conftest import TIMEOUT_S, Target, fuzz_settings

POSTS = [("prm", "/v1/score"), ("prm", "/get_reward"), ("sandbox", "/v1/run"), ("sandbox", "/v1/run/batch"),
         ("sandbox", "/run_code")]  # fmt: skip
IDS = [f"{s} {p}" for s, p in POSTS]
JSON_HEADERS = {"Content-Type": "application/json"}

ODD_TEXT = ["", "\n", "\x00", "\ud7ff\ue000", "<|endoftext|>", "\r\n\r\n", "# c\n\n", "\u2028x\x85"]
scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40) | st.sampled_from(ODD_TEXT)
)
any_json = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)
code_text = st.text(max_size=200) | st.sampled_from(
    ["def f(x):\n    return x\n", "import sys\nsys.exit(0)\n", "print(input())\n", "raise SystemExit(3)\n",
     "x = [1] * 10**6\n", "def f(*a):\n    return a\n"]
)  # fmt: skip
numbers = st.none() | st.integers() | st.floats() | st.text(max_size=4)


def _maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes any JSON at all."""
    return st.one_of(valid, valid, valid, any_json)


tests_spec = st.one_of(
    st.fixed_dictionaries({"kind": st.just("assert"), "code": _maybe(code_text)}),
    st.fixed_dictionaries({"kind": st.just("humaneval"), "test": _maybe(code_text),
                           "entry_point": _maybe(st.text(max_size=10))}),
    st.fixed_dictionaries({"kind": st.just("stdio"), "cases": _maybe(st.lists(st.fixed_dictionaries(
        {"stdin": _maybe(st.text(max_size=20)), "stdout": _maybe(st.text(max_size=20))}), max_size=4))}),
    st.fixed_dictionaries({"kind": st.just("call"), "fn": _maybe(st.sampled_from(["f", "g", "1f", ""])),
                           "cases": _maybe(st.lists(st.fixed_dictionaries({"args": _maybe(st.lists(any_json,
                                            max_size=3)), "expected": any_json}), max_size=4))}),
    any_json,
)  # fmt: skip
run_request = st.fixed_dictionaries(
    {"code": _maybe(code_text), "tests": tests_spec},
    optional={"timeout_s": numbers, "memory_mb": numbers, "extra": any_json},
)
score_item = st.fixed_dictionaries(
    {"prompt": _maybe(st.text(max_size=60)), "response": _maybe(st.text(min_size=1, max_size=300))}
)
CALL = {"kind": "call", "fn": "f", "cases": [{"args": [1, [2.5, None]], "expected": [1, [2.5, None]]}]}
STDIO = {"kind": "stdio", "cases": [{"stdin": "x", "stdout": "x"}]}
VALID: dict[str, Any] = {
    "/v1/score": {"items": [{"prompt": "def f():\n", "response": "    return 1\n\n    # done"}]},
    "/get_reward": {"query": ["def f():\n    return 1"], "prompts": ["def f():\n"]},
    "/v1/run": {"code": "def f(*a):\n    return list(a)\n", "tests": CALL, "timeout_s": 2, "memory_mb": 128},
    "/v1/run/batch": {
        "requests": [{"code": "print(input())", "tests": STDIO}, {"code": "x = 1", "tests": STDIO}]
    },
    "/run_code": {"code": "print(1)", "language": "python", "stdin": ""},
}
SHAPED: dict[str, st.SearchStrategy[Any]] = {
    "/v1/score": st.fixed_dictionaries(
        {"items": _maybe(st.lists(score_item, min_size=1, max_size=9))},
        optional={"aggregate": _maybe(st.sampled_from(["min", "mean", "last", "max"]))},
    ),
    "/get_reward": st.fixed_dictionaries(
        {"query": _maybe(st.lists(st.text(max_size=200), max_size=9))},
        optional={"prompts": _maybe(st.lists(st.text(max_size=20), max_size=9)), "labels": any_json},
    ),
    "/v1/run": run_request,
    "/v1/run/batch": st.fixed_dictionaries({"requests": _maybe(st.lists(run_request, max_size=9))}),
    "/run_code": st.fixed_dictionaries(
        {"code": _maybe(code_text)},
        optional={"language": _maybe(st.sampled_from(["python", "python3", "cpp", ""])),
                  "run_timeout": numbers, "memory_limit_MB": numbers, "stdin": _maybe(st.text(max_size=20)),
                  "files": any_json, "fetch_files": any_json, "compile_timeout": numbers},
    ),
}  # fmt: skip


def _post(target: Target, path: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    response = httpx.post(target.http_url + path, content=content, headers=headers or JSON_HEADERS,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]} for {content[:300]!r}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error, str) and "\n" not in error, response.text
    return response


@pytest.mark.parametrize(("service", "path"), POSTS, ids=IDS)
def test_raw_bytes(request: pytest.FixtureRequest, service: str, path: str) -> None:
    target: Target = request.getfixturevalue(f"{service}_target")

    @fuzz_settings(30)
    @given(
        body=st.binary(max_size=300) | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass"))
    )
    def check(body: bytes) -> None:
        _post(target, path, body)

    check()
    target.assert_serving()


@pytest.mark.parametrize(("service", "path"), POSTS, ids=IDS)
def test_json(request: pytest.FixtureRequest, service: str, path: str) -> None:
    """Any JSON, and requests of the right shape with hostile values (NaN and Infinity literals too)."""
    target: Target = request.getfixturevalue(f"{service}_target")
    statuses: set[int] = set()

    @fuzz_settings(60)
    @given(value=st.one_of(any_json, SHAPED[path], SHAPED[path]))
    @example(value=VALID[path])  # the accepted path is always reached, whatever the generator favours
    @example(value={})
    def check(value: Any) -> None:
        statuses.add(_post(target, path, json.dumps(value).encode("utf-8", "surrogatepass")).status_code)

    check()
    assert 200 in statuses and 422 in statuses, sorted(statuses)
    target.assert_serving()


DEEP = b"[" * 50_000 + b"]" * 50_000
ODD_BODIES = [
    (b'{"items": ' + DEEP + b"}", JSON_HEADERS),
    (b'{"code": "x = 1", "tests": {"kind": "call", "fn": "f", "cases": [{"args": [' + b"9" * 5000 + b'], '
     b'"expected": 1}]}}', JSON_HEADERS),
    (b'{"a": 1, "a": 2}', JSON_HEADERS),
    (b"\xef\xbb\xbf{}", JSON_HEADERS),
    ('{"x": "é"}'.encode("utf-16"), {"Content-Type": "application/json; charset=utf-16"}),
    (b"{}", {"Content-Type": "text/plain"}),
    (b"{}", {}),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--b--\r\n",
     {"Content-Type": "multipart/form-data; boundary=b"}),
    (b"\x1f\x8b\x08\x00garbage", {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
    (b"a=1&b=2", {"Content-Type": "application/x-www-form-urlencoded"}),
]  # fmt: skip


@pytest.mark.parametrize(("service", "path"), POSTS, ids=IDS)
def test_odd_bodies_and_content_types(request: pytest.FixtureRequest, service: str, path: str) -> None:
    target: Target = request.getfixturevalue(f"{service}_target")
    for body, headers in ODD_BODIES:
        assert _post(target, path, body, headers).status_code >= 400
    target.assert_serving()


def _exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, close our side, read the answer until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before it has read it all
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while sum(map(len, chunks)) < 1 << 20:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


request_lines = st.builds(
    lambda method, path, version, headers, body: method + b" " + path + b" " + version + b"\r\n" + headers
    + b"\r\n" + body,
    st.sampled_from([b"GET", b"POST", b"PUT", b"\x00", b"PRI"]) | st.binary(max_size=8),
    st.sampled_from([b"/v1/score", b"/v1/run", b"*", b"/%00", b"/" + b"a" * 9000]) | st.binary(max_size=20),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9"]) | st.binary(max_size=10),
    st.sampled_from([b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: -1\r\n",
                     b"Content-Length: 99999999999999999999\r\n", b"Host: x\r\nHost: y\r\n",
                     b"X: " + b"a" * 70000 + b"\r\n", b""]) | st.binary(max_size=40),
    st.binary(max_size=64),
)  # fmt: skip


@pytest.mark.parametrize("service", ["prm", "sandbox"])
def test_raw_socket(request: pytest.FixtureRequest, service: str) -> None:
    """Garbage and malformed HTTP/1.1 on the HTTP port, random bytes on the gRPC (HTTP/2) port: the
    connection gets an error or is closed, never a 5xx or a hang, and the service keeps serving."""
    target: Target = request.getfixturevalue(f"{service}_target")

    @fuzz_settings(40)
    @given(data=request_lines | st.binary(min_size=1, max_size=200), to_grpc=st.booleans())
    def check(data: bytes, to_grpc: bool) -> None:
        answer = _exchange(target.running.grpc_port if to_grpc else target.running.http_port, data)
        assert not answer.startswith(b"HTTP/1.1 5"), answer[:300]

    check()
    target.assert_serving()


@pytest.mark.parametrize("service", ["prm", "sandbox"])
def test_stalled_clients_do_not_block_others(request: pytest.FixtureRequest, service: str) -> None:
    """64 connections that send half a request and stall: the service answers others meanwhile."""
    target: Target = request.getfixturevalue(f"{service}_target")
    stalled = []
    try:
        for i in range(64):
            sock = socket.create_connection(("127.0.0.1", target.running.http_port), timeout=TIMEOUT_S)
            head = f"POST {target.good_path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            sock.sendall((head + "Content-Length: 1000\r\n\r\n{" if i % 2 else head).encode())
            stalled.append(sock)
        target.assert_serving()
    finally:
        for sock in stalled:
            sock.close()
    target.assert_serving()
