from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_PASSED: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]
    RUN_STATUS_ERROR: _ClassVar[RunStatus]
    RUN_STATUS_TIMEOUT: _ClassVar[RunStatus]
    RUN_STATUS_MEMORY: _ClassVar[RunStatus]
    RUN_STATUS_OUTPUT_LIMIT: _ClassVar[RunStatus]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_PASSED: RunStatus
RUN_STATUS_FAILED: RunStatus
RUN_STATUS_ERROR: RunStatus
RUN_STATUS_TIMEOUT: RunStatus
RUN_STATUS_MEMORY: RunStatus
RUN_STATUS_OUTPUT_LIMIT: RunStatus

class AssertTests(_message.Message):
    __slots__ = ("code",)
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: str
    def __init__(self, code: _Optional[str] = ...) -> None: ...

class HumanEvalTests(_message.Message):
    __slots__ = ("test", "entry_point")
    TEST_FIELD_NUMBER: _ClassVar[int]
    ENTRY_POINT_FIELD_NUMBER: _ClassVar[int]
    test: str
    entry_point: str
    def __init__(self, test: _Optional[str] = ..., entry_point: _Optional[str] = ...) -> None: ...

class StdioCase(_message.Message):
    __slots__ = ("stdin", "stdout")
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    stdin: str
    stdout: str
    def __init__(self, stdin: _Optional[str] = ..., stdout: _Optional[str] = ...) -> None: ...

class StdioTests(_message.Message):
    __slots__ = ("cases",)
    CASES_FIELD_NUMBER: _ClassVar[int]
    cases: _containers.RepeatedCompositeFieldContainer[StdioCase]
    def __init__(self, cases: _Optional[_Iterable[_Union[StdioCase, _Mapping]]] = ...) -> None: ...

class CallCase(_message.Message):
    __slots__ = ("args_json", "expected_json")
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_JSON_FIELD_NUMBER: _ClassVar[int]
    args_json: str
    expected_json: str
    def __init__(self, args_json: _Optional[str] = ..., expected_json: _Optional[str] = ...) -> None: ...

class CallTests(_message.Message):
    __slots__ = ("fn", "cases")
    FN_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    fn: str
    cases: _containers.RepeatedCompositeFieldContainer[CallCase]
    def __init__(self, fn: _Optional[str] = ..., cases: _Optional[_Iterable[_Union[CallCase, _Mapping]]] = ...) -> None: ...

class TestSpec(_message.Message):
    __slots__ = ("assert_tests", "humaneval", "stdio", "call")
    ASSERT_TESTS_FIELD_NUMBER: _ClassVar[int]
    HUMANEVAL_FIELD_NUMBER: _ClassVar[int]
    STDIO_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    assert_tests: AssertTests
    humaneval: HumanEvalTests
    stdio: StdioTests
    call: CallTests
    def __init__(self, assert_tests: _Optional[_Union[AssertTests, _Mapping]] = ..., humaneval: _Optional[_Union[HumanEvalTests, _Mapping]] = ..., stdio: _Optional[_Union[StdioTests, _Mapping]] = ..., call: _Optional[_Union[CallTests, _Mapping]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("code", "tests", "timeout_s", "memory_mb")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    code: str
    tests: TestSpec
    timeout_s: float
    memory_mb: int
    def __init__(self, code: _Optional[str] = ..., tests: _Optional[_Union[TestSpec, _Mapping]] = ..., timeout_s: _Optional[float] = ..., memory_mb: _Optional[int] = ...) -> None: ...

class RunResult(_message.Message):
    __slots__ = ("status", "passed", "tests_passed", "tests_total", "duration_ms", "stdout", "stderr", "detail")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    TESTS_PASSED_FIELD_NUMBER: _ClassVar[int]
    TESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    passed: bool
    tests_passed: int
    tests_total: int
    duration_ms: float
    stdout: str
    stderr: str
    detail: str
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ..., passed: _Optional[bool] = ..., tests_passed: _Optional[int] = ..., tests_total: _Optional[int] = ..., duration_ms: _Optional[float] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class RunBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RunRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RunRequest, _Mapping]]] = ...) -> None: ...

class RunBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RunResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RunResult, _Mapping]]] = ...) -> None: ...
