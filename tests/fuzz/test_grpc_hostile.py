"""Hostile input at the gRPC edge: random bytes as request messages (through a generic channel with
no serializers, so the servers' own decoders see them), valid requests with bytes flipped, inserted
or cut, valid-but-weird protobufs (NaN and negative limits, unknown enum values, empty and huge
fields), and unknown methods. Properties: a status a client can act on (OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED; UNIMPLEMENTED only for unknown methods), never UNKNOWN / INTERNAL / a missed
deadline, and the service still answers a good request afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from psgpo.v1 import prm_pb2, sandbox_pb2
from tests.fuzz.conftest import TIMEOUT_S, Target, fuzz_settings

ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
GOOD_PB = {
    "/psgpo.v1.PrmService/Score": prm_pb2.ScoreRequest(
        items=[prm_pb2.ScoreItem(prompt="def f():\n", response="    return 1")]
    ),
    "/psgpo.v1.PrmService/GetReward": prm_pb2.RewardRequest(query=["def f():\n    return 1"]),
    "/psgpo.v1.SandboxService/Run": sandbox_pb2.RunRequest(
        code="def f():\n    return 1\n",
        tests=sandbox_pb2.TestSpec(assert_tests=sandbox_pb2.AssertTests(code="assert f() == 1\n")),
    ),
}
GOOD_PB["/psgpo.v1.SandboxService/RunBatch"] = sandbox_pb2.RunBatchRequest(
    requests=[GOOD_PB["/psgpo.v1.SandboxService/Run"]] * 2
)
METHODS = {
    "prm": ["/psgpo.v1.PrmService/Score", "/psgpo.v1.PrmService/GetReward", "/grpc.health.v1.Health/Check"],
    "sandbox": ["/psgpo.v1.SandboxService/Run", "/psgpo.v1.SandboxService/RunBatch",
                "/grpc.health.v1.Health/Check"],
}  # fmt: skip
CASES = [(service, method) for service, methods in METHODS.items() for method in methods]
IDS = [f"{s} {m.rsplit('/', 2)[-2].rsplit('.', 1)[-1]}.{m.rsplit('/', 1)[-1]}" for s, m in CASES]


@pytest.fixture(scope="module")
def channels(prm_target: Target, sandbox_target: Target) -> Iterator[dict[str, grpc.Channel]]:
    opened = {t.name: grpc.insecure_channel(t.grpc_target) for t in (prm_target, sandbox_target)}
    yield opened
    for channel in opened.values():
        channel.close()


def _call(channel: grpc.Channel, method: str, data: bytes) -> grpc.StatusCode:
    raw = channel.unary_unary(method)  # no serializers: the bytes go to the server as they are
    try:
        raw(data, timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _assert_serving(channel: grpc.Channel, target: Target) -> None:
    for method, message in GOOD_PB.items():
        if method.split("/")[1].endswith("PrmService") == (target.name == "prm"):
            assert _call(channel, method, message.SerializeToString()) == grpc.StatusCode.OK, method
    target.assert_serving()


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, byte) edits: 0 flips a byte, 1 inserts one, 2 deletes one, 3 truncates."""
    out = bytearray(data)
    for kind, pos, value in edits:
        at = pos % (len(out) + 1)
        if kind == 0 and at < len(out):
            out[at] ^= value or 1
        elif kind == 1:
            out.insert(at, value)
        elif kind == 2 and at < len(out):
            del out[at]
        elif kind == 3:
            del out[at:]
    return bytes(out)


edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6
)


@pytest.mark.parametrize(("service", "method"), CASES, ids=IDS)
def test_random_and_mutated_bytes(
    request: pytest.FixtureRequest, channels: dict[str, grpc.Channel], service: str, method: str
) -> None:
    target: Target = request.getfixturevalue(f"{service}_target")
    channel = channels[service]
    good = GOOD_PB[method].SerializeToString() if method in GOOD_PB else b""

    @fuzz_settings(40)
    @given(data=st.binary(max_size=256) | edits.map(lambda e: _mutate(good, e)))
    def check(data: bytes) -> None:
        code = _call(channel, method, data)
        assert code in ACCEPTABLE, f"{code} for {data[:200]!r}"

    check()
    _assert_serving(channel, target)


texts = st.text(max_size=80) | st.sampled_from(["", "\n" * 50, "# only\n# comments", "<|endoftext|>", "\x00"])
doubles = st.floats() | st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e300])
int32s = st.integers(-(2**31), 2**31 - 1)
score_requests = st.builds(
    lambda items, aggregate: prm_pb2.ScoreRequest(
        items=[prm_pb2.ScoreItem(prompt=p, response=r) for p, r in items], aggregate=aggregate
    ),
    st.lists(st.tuples(texts, texts), max_size=10),
    int32s | st.integers(0, 3),
)
reward_requests = st.builds(
    lambda q, p: prm_pb2.RewardRequest(query=q, prompts=p),
    st.lists(texts, max_size=10),
    st.lists(texts, max_size=10),
)


def _stdio(cases: list[tuple[str, str]]) -> sandbox_pb2.TestSpec:
    return sandbox_pb2.TestSpec(
        stdio=sandbox_pb2.StdioTests(cases=[sandbox_pb2.StdioCase(stdin=i, stdout=o) for i, o in cases])
    )


def _call_tests(fn: str, cases: list[tuple[str, str]]) -> sandbox_pb2.TestSpec:
    pb_cases = [sandbox_pb2.CallCase(args_json=a, expected_json=e) for a, e in cases]
    return sandbox_pb2.TestSpec(call=sandbox_pb2.CallTests(fn=fn, cases=pb_cases))


def _humaneval(test: str, entry_point: str) -> sandbox_pb2.TestSpec:
    return sandbox_pb2.TestSpec(humaneval=sandbox_pb2.HumanEvalTests(test=test, entry_point=entry_point))


json_texts = st.sampled_from(["[]", "[1]", "[NaN]", "{}", "", "[[[[", "[1e999]", "1", "null", '"x"']) | texts
test_specs = st.one_of(
    st.just(sandbox_pb2.TestSpec()),
    texts.map(lambda c: sandbox_pb2.TestSpec(assert_tests=sandbox_pb2.AssertTests(code=c))),
    st.builds(_humaneval, texts, texts),
    st.lists(st.tuples(texts, texts), max_size=4).map(_stdio),
    st.builds(_call_tests, st.sampled_from(["f", "", "1x", "f.g"]) | texts,
              st.lists(st.tuples(json_texts, json_texts), max_size=4)),
)  # fmt: skip
run_requests = st.builds(
    lambda code, tests, has_tests, timeout, memory: sandbox_pb2.RunRequest(
        code=code, tests=tests if has_tests else None, timeout_s=timeout, memory_mb=memory
    ),
    texts | st.just("def f(*a):\n    return 1\n"),
    test_specs,
    st.booleans(),
    doubles,
    int32s,
)
WEIRD = {
    "/psgpo.v1.PrmService/Score": score_requests,
    "/psgpo.v1.PrmService/GetReward": reward_requests,
    "/psgpo.v1.SandboxService/Run": run_requests,
    "/psgpo.v1.SandboxService/RunBatch": st.lists(run_requests, max_size=4).map(
        lambda rs: sandbox_pb2.RunBatchRequest(requests=rs)
    ),
}


@pytest.mark.parametrize("method", list(WEIRD))
def test_weird_valid_messages(
    request: pytest.FixtureRequest, channels: dict[str, grpc.Channel], method: str
) -> None:
    service = "prm" if "PrmService" in method else "sandbox"
    target: Target = request.getfixturevalue(f"{service}_target")
    channel = channels[service]
    codes: set[grpc.StatusCode] = set()

    @fuzz_settings(40)
    @given(message=WEIRD[method])
    @example(message=GOOD_PB[method])  # both outcomes are always reached, whatever the generator favours
    @example(message=type(GOOD_PB[method])())
    def check(message: object) -> None:
        code = _call(channel, method, message.SerializeToString())  # type: ignore[attr-defined]
        assert code in ACCEPTABLE, f"{code} for {message}"
        codes.add(code)

    check()
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.INVALID_ARGUMENT in codes, codes
    _assert_serving(channel, target)


@pytest.mark.parametrize("service", ["prm", "sandbox"])
def test_unknown_methods(
    request: pytest.FixtureRequest, channels: dict[str, grpc.Channel], service: str
) -> None:
    target: Target = request.getfixturevalue(f"{service}_target")

    @fuzz_settings(15)
    @given(name=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30))
    def check(name: str) -> None:
        assert (
            _call(channels[service], f"/psgpo.v1.Nope/{name}", b"\x0a\x00") == grpc.StatusCode.UNIMPLEMENTED
        )

    check()
    _assert_serving(channels[service], target)
