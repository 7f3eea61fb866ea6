"""SandboxFusion-compatible response for POST /run_code (Python only), built from one script run.

Same shape as SandboxFusion's RunCodeResponse: `status` Success | Failed | SandboxError, `message`,
`compile_result` (always null for Python), `run_result` {status Finished | TimeLimitExceeded | Error,
execution_time (s), return_code, stdout, stderr}, `executor_pod_name`, `files`.

One deliberate difference: SandboxFusion's verdict is the exit code, so `sys.exit(0)` placed before
failing asserts reads as Success. Here, when the code contains `assert` statements and the program
left through sys.exit / os._exit before its last statement, the status is Failed (the exit code is
reported as it was). /v1/run gives a verdict that does not rest on exit codes at all.
"""

from __future__ import annotations

import ast
from typing import Any

from services.sandbox.verdict import Run, limit_status, script_completed

LANGUAGES = frozenset({"python", "python3"})


def has_asserts(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return any(isinstance(node, ast.Assert) for node in ast.walk(tree))


def fusion_response(run: Run, code: str) -> dict[str, Any]:
    seconds = round(run.duration_ms / 1000.0, 6)
    return_code: int | None = run.exit_code if run.signal is None else -run.signal
    run_status = "Finished"
    status = "Success"
    message = ""
    limited = limit_status(run)
    if run.setup_error:
        status, run_status, message, return_code = "SandboxError", "Error", run.setup_error, None
    elif run.timed_out:
        status, run_status, message, return_code = "Failed", "TimeLimitExceeded", "", None
    elif limited is not None:
        status, message = "Failed", limited[1]
    elif return_code != 0:
        status = "Failed"
    elif not script_completed(run) and has_asserts(code):
        status = "Failed"
        message = (
            "the program exited (sys.exit / os._exit) before its last statement, so its asserts "
            "are not counted as passed"
        )
    return {
        "status": status,
        "message": message,
        "compile_result": None,
        "run_result": {
            "status": run_status,
            "execution_time": seconds,
            "return_code": return_code,
            "stdout": run.stdout,
            "stderr": run.stderr,
        },
        "executor_pod_name": None,
        "files": {},
    }
