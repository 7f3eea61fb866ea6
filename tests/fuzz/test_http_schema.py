"""Property-based fuzzing of every HTTP operation from the services' own OpenAPI schemas (schemathesis):
requests that fit the schema and requests that break it (wrong types, missing fields, extra ones,
odd strings and numbers). Properties: never a 5xx, never a hang, an answer that fits the documented
schema when it is documented, a one-line `{"error": ...}` body otherwise, and the service still
answers a good request afterwards."""

from __future__ import annotations

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import given
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.fuzz.conftest import TIMEOUT_S, Target, fuzz_settings

OPERATIONS = {
    "prm": [("POST", "/v1/score"), ("POST", "/get_reward"), ("GET", "/v1/info"), ("GET", "/healthz"),
            ("GET", "/readyz"), ("GET", "/metrics")],
    "sandbox": [("POST", "/v1/run"), ("POST", "/v1/run/batch"), ("POST", "/run_code"), ("GET", "/v1/info"),
                ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")],
}  # fmt: skip
CASES = [(service, method, path) for service, ops in OPERATIONS.items() for method, path in ops]


def test_schema_lists_every_operation(target: Target) -> None:
    """The fuzzed list is the whole API: a new endpoint must be added to OPERATIONS."""
    schema = schemathesis.openapi.from_url(f"{target.http_url}/openapi.json")
    found = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert found == set(OPERATIONS[target.name])


@pytest.mark.parametrize(("service", "method", "path"), CASES, ids=[f"{s} {m} {p}" for s, m, p in CASES])
def test_operation(request: pytest.FixtureRequest, service: str, method: str, path: str) -> None:
    target: Target = request.getfixturevalue(f"{service}_target")
    schema = schemathesis.openapi.from_url(f"{target.http_url}/openapi.json")
    operation = schema[path][method]
    cases = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | operation.as_strategy(
        generation_mode=GenerationMode.NEGATIVE
    )
    statuses: dict[int, int] = {}

    @fuzz_settings(40 if method == "POST" else 5)
    @given(case=cases)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=target.http_url, timeout=TIMEOUT_S)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
        if response.status_code >= 400:
            body = orjson.loads(response.content)
            assert set(body) == {"error"} and "\n" not in body["error"], body
        case.validate_response(response, checks=[response_schema_conformance])

    check()
    assert statuses, "no request was sent"
    target.assert_serving()


@pytest.mark.parametrize(
    ("service", "path", "model"),
    [("prm", "/v1/score", "ScoreResponse"), ("prm", "/get_reward", "RewardResponse"),
     ("sandbox", "/v1/run", "RunOut"), ("sandbox", "/v1/run/batch", "BatchOut")],
)  # fmt: skip
def test_openapi_documents_bodies(
    request: pytest.FixtureRequest, service: str, path: str, model: str
) -> None:
    """Regression: with a plain Response subclass as the response class, FastAPI documented every 200
    body as a string, and 422 as its own validation-error shape that these services never send."""
    target: Target = request.getfixturevalue(f"{service}_target")
    spec = httpx.get(f"{target.http_url}/openapi.json", timeout=TIMEOUT_S).json()
    responses = spec["paths"][path]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{model}"
    }
    for status in ("413", "422", "429", "503"):
        assert responses[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorOut"
        }
