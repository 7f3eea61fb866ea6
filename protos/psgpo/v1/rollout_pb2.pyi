from psgpo.v1 import sandbox_pb2 as _sandbox_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_new_tokens", "seed", "stop")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("schema_version", "task_id", "prompt", "tests", "n", "sampling", "metadata", "score_with_prm")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SCORE_WITH_PRM_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    task_id: str
    prompt: str
    tests: _sandbox_pb2.TestSpec
    n: int
    sampling: SamplingParams
    metadata: _containers.ScalarMap[str, str]
    score_with_prm: bool
    def __init__(self, schema_version: _Optional[int] = ..., task_id: _Optional[str] = ..., prompt: _Optional[str] = ..., tests: _Optional[_Union[_sandbox_pb2.TestSpec, _Mapping]] = ..., n: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., score_with_prm: _Optional[bool] = ...) -> None: ...

class LineSpan(_message.Message):
    __slots__ = ("line", "start", "end", "token_index", "neutral")
    LINE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    NEUTRAL_FIELD_NUMBER: _ClassVar[int]
    line: int
    start: int
    end: int
    token_index: int
    neutral: bool
    def __init__(self, line: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., token_index: _Optional[int] = ..., neutral: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("generate_ms", "sandbox_ms", "prm_ms")
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_MS_FIELD_NUMBER: _ClassVar[int]
    PRM_MS_FIELD_NUMBER: _ClassVar[int]
    generate_ms: float
    sandbox_ms: float
    prm_ms: float
    def __init__(self, generate_ms: _Optional[float] = ..., sandbox_ms: _Optional[float] = ..., prm_ms: _Optional[float] = ...) -> None: ...

class ScoringFailure(_message.Message):
    __slots__ = ("component", "reason", "attempts")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    component: str
    reason: str
    attempts: int
    def __init__(self, component: _Optional[str] = ..., reason: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...

class Trajectory(_message.Message):
    __slots__ = ("schema_version", "trajectory_id", "task_id", "sample_index", "policy_version", "prompt", "response", "prompt_token_ids", "response_token_ids", "logprobs", "lines", "verdict", "prm_scores", "has_prm_scores", "prm_model", "timings", "failures", "finish_reason", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    PRM_SCORES_FIELD_NUMBER: _ClassVar[int]
    HAS_PRM_SCORES_FIELD_NUMBER: _ClassVar[int]
    PRM_MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    trajectory_id: str
    task_id: str
    sample_index: int
    policy_version: int
    prompt: str
    response: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    lines: _containers.RepeatedCompositeFieldContainer[LineSpan]
    verdict: _sandbox_pb2.RunResult
    prm_scores: _containers.RepeatedScalarFieldContainer[float]
    has_prm_scores: bool
    prm_model: str
    timings: Timings
    failures: _containers.RepeatedCompositeFieldContainer[ScoringFailure]
    finish_reason: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, schema_version: _Optional[int] = ..., trajectory_id: _Optional[str] = ..., task_id: _Optional[str] = ..., sample_index: _Optional[int] = ..., policy_version: _Optional[int] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., lines: _Optional[_Iterable[_Union[LineSpan, _Mapping]]] = ..., verdict: _Optional[_Union[_sandbox_pb2.RunResult, _Mapping]] = ..., prm_scores: _Optional[_Iterable[float]] = ..., has_prm_scores: _Optional[bool] = ..., prm_model: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., failures: _Optional[_Iterable[_Union[ScoringFailure, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
