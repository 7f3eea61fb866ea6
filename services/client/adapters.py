"""Reward functions for other RL frameworks, backed by the psgpo sandbox (unit tests) and optionally
the PRM (line scores), both over HTTP. Imports no torch; docs/clients.md shows each in use.

reward = (1.0 if the program passes every test else 0.0) + prm_weight * PRM aggregate

The PRM aggregate (`min` by default, or `mean` / `last`) is taken over the program's scored lines;
a program whose lines are all neutral (blank or comment-only) gets no PRM term, as in PSGPO. With a
PRM URL and `prm_weight` 0 the PRM is still called and its aggregate reported, not added.

A failed call never becomes a reward: when the sandbox or the PRM is unreachable, overloaded or
refuses the request after the clients' bounded retries, the function raises `RewardError`; bad
tests raise ValueError. A program that fails, crashes, times out or runs out of memory is a verdict
(reward 0 from the tests), not a failure.

- verl: `compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)` (one
  sample: reward managers `naive`, `dapo`, and the reward loop) and `compute_score_batch(...)`
  (reward manager `batch`), configured by environment variables (`RewardConfig.from_env`).
- TRL: `make_trl_reward(sandbox_url, tests_column="tests", ...)` returns the callable GRPOTrainer
  wants: `reward(prompts=..., completions=..., completion_ids=..., **dataset_columns)`.
- OpenRLHF: the PRM service itself serves the remote reward protocol at `POST /get_reward`;
  `check_openrlhf_reward_url(url)` (or `python -m services.client.adapters check-openrlhf URL`)
  checks that a URL speaks it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import httpx

from services.client.testspec import TestsLike, parse_tests
from services.prm.client import AGGREGATE_ENUM, ItemScore, PrmError, PrmHttpClient
from services.sandbox.client import RetryPolicy, SandboxClient, SandboxError
from services.sandbox.model import RunRequest, RunResult, TestSpec

__all__ = [
    "ENV",
    "PsgpoTrlReward",
    "Reward",
    "RewardConfig",
    "RewardError",
    "RewardScorer",
    "check_openrlhf_reward_url",
    "compute_score",
    "compute_score_batch",
    "extract_code",
    "make_trl_reward",
]


class RewardError(RuntimeError):
    """No reward could be computed: a service call failed after its retries or was refused."""


# --------------------------------------------------------------------------------------- settings

# RewardConfig field -> environment variable (RewardConfig.from_env, the verl adapter).
ENV = {
    "sandbox_url": "PSGPO_SANDBOX_URL",
    "sandbox_token": "PSGPO_SANDBOX_TOKEN",
    "prm_url": "PSGPO_PRM_URL",
    "prm_token": "PSGPO_PRM_TOKEN",
    "prm_weight": "PSGPO_PRM_WEIGHT",
    "prm_aggregate": "PSGPO_PRM_AGGREGATE",
    "extract_code": "PSGPO_EXTRACT_CODE",
    "prepend_prompt": "PSGPO_PREPEND_PROMPT",
    "run_timeout_s": "PSGPO_RUN_TIMEOUT_S",
    "http_timeout_s": "PSGPO_HTTP_TIMEOUT_S",
    "retries": "PSGPO_RETRIES",
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True)
class RewardConfig:
    """Where the services are and how a reward is made."""

    sandbox_url: str
    """Sandbox HTTP base URL, e.g. http://127.0.0.1:8002."""
    sandbox_token: str | None = None
    """Bearer token of the sandbox (when it runs with one)."""
    prm_url: str | None = None
    """PRM HTTP base URL, e.g. http://127.0.0.1:8001; None: no PRM."""
    prm_token: str | None = None
    """Bearer token of the PRM."""
    prm_weight: float = 0.0
    """Weight of the PRM aggregate in the reward."""
    prm_aggregate: str = "min"
    """How the PRM's line scores become one number: min, mean or last."""
    extract_code: bool = True
    """Run the last fenced code block (```python ... ```) of a response that has one."""
    prepend_prompt: bool = False
    """Run prompt + code (completion-style prompts that end inside the program, e.g. HumanEval)."""
    run_timeout_s: float | None = None
    """Time limit per program sent to the sandbox; None: the sandbox's default."""
    http_timeout_s: float = 300.0
    """Timeout of one HTTP request to either service."""
    retries: int = 3
    """Retries of a failed or overloaded service call before RewardError."""

    def __post_init__(self) -> None:
        if not self.sandbox_url.startswith(("http://", "https://")):
            raise ValueError(f"sandbox_url must be an http(s):// URL, got {self.sandbox_url!r}")
        if self.prm_url is not None and not self.prm_url.startswith(("http://", "https://")):
            raise ValueError(f"prm_url must be an http(s):// URL, got {self.prm_url!r}")
        if self.prm_aggregate not in AGGREGATE_ENUM:
            raise ValueError(
                f"prm_aggregate must be one of {sorted(AGGREGATE_ENUM)}, got {self.prm_aggregate!r}"
            )
        if not math.isfinite(self.prm_weight):
            raise ValueError("prm_weight must be finite")
        if self.prm_weight != 0 and self.prm_url is None:
            raise ValueError("prm_weight is set but no PRM URL is given")
        if self.retries < 0 or self.http_timeout_s <= 0:
            raise ValueError("retries must be >= 0 and http_timeout_s > 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RewardConfig:
        """From the PSGPO_* variables in `ENV` (PSGPO_SANDBOX_URL is required); `overrides` (field
        names) win over the environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in fields(cls):
            text = env.get(ENV[field.name], "").strip()
            if text:
                values[field.name] = _parse_env(field.name, text)
        values.update(overrides)
        if not values.get("sandbox_url"):
            raise ValueError(f"no sandbox URL: set {ENV['sandbox_url']} (e.g. http://127.0.0.1:8002)")
        return cls(**values)


def _parse_env(name: str, text: str) -> Any:
    variable = ENV[name]
    if name in ("extract_code", "prepend_prompt"):
        if text.lower() not in _TRUE | _FALSE:
            raise ValueError(f"{variable}={text!r}: expected 1/0, true/false, yes/no or on/off")
        return text.lower() in _TRUE
    try:
        if name == "retries":
            return int(text)
        if name in ("prm_weight", "run_timeout_s", "http_timeout_s"):
            return float(text)
    except ValueError:
        raise ValueError(f"{variable}={text!r} is not a number") from None
    return text


# ---------------------------------------------------------------------------------------- scoring

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The code of a response: its last ```python (or ```py) block, else its last bare ``` block,
    else its last fenced block of any language; an unclosed last fence (a truncated response) runs
    to the end. `text` itself when it has no fence."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return text
    python = [code for language, code in blocks if language.lower() in ("python", "py", "python3")]
    bare = [code for language, code in blocks if not language]
    return (python or bare or [code for _, code in blocks])[-1]


@dataclass(frozen=True, slots=True)
class Reward:
    """One scored solution."""

    score: float  # the reward
    passed: bool  # every test passed
    status: str  # sandbox verdict: passed, failed, error, timeout, memory, output_limit
    tests_passed: int
    tests_total: int
    prm: float | None  # PRM aggregate over scored lines; None without a PRM or without scored lines
    prm_lines: int  # lines the PRM scored (non-neutral)

    def as_dict(self, with_prm: bool) -> dict[str, Any]:
        """verl's dict: "score" is the reward; the other keys are logged per sample (same keys for
        every sample of a run, numbers except `sandbox_status`, which verl's metrics skip)."""
        out: dict[str, Any] = {
            "score": self.score,
            "acc": 1.0 if self.passed else 0.0,
            "tests_passed": self.tests_passed,
            "tests_total": self.tests_total,
            "sandbox_status": self.status,
        }
        if with_prm:
            out["prm_score"] = 0.0 if self.prm is None else self.prm
            out["prm_lines"] = self.prm_lines
        return out


class RewardScorer:
    """Scores solutions against tests through the services of a RewardConfig. Thread-safe; pickles
    as its config (HTTP clients are rebuilt on first use, e.g. in a spawned worker process)."""

    def __init__(self, config: RewardConfig):
        self.config = config
        self._lock = threading.Lock()
        self._sandbox: SandboxClient | None = None
        self._prm: PrmHttpClient | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])  # type: ignore[misc]

    def _clients(self) -> tuple[SandboxClient, PrmHttpClient | None, ThreadPoolExecutor]:
        with self._lock:
            if self._sandbox is None:
                c = self.config
                retry = RetryPolicy(attempts=c.retries + 1)
                self._sandbox = SandboxClient(c.sandbox_url, c.sandbox_token, c.http_timeout_s, retry)
                if c.prm_url is not None:
                    self._prm = PrmHttpClient(c.prm_url, c.prm_token, c.http_timeout_s, c.retries)
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="psgpo-prm")
            assert self._pool is not None
            return self._sandbox, self._prm, self._pool

    def code(self, solution: str) -> str:
        """The solution's code: its last fenced block when extract_code is on and it has one. The
        PRM scores this (given the prompt)."""
        return extract_code(solution) if self.config.extract_code else solution

    def program(self, solution: str, prompt: str | None) -> str:
        """What the sandbox runs: the code, after the prompt when prepend_prompt is on."""
        code = self.code(solution)
        if self.config.prepend_prompt:
            if prompt is None:
                raise ValueError("prepend_prompt is on but no prompt was given")
            return prompt + code
        return code

    def score(
        self,
        solutions: Sequence[str],
        tests: Sequence[TestsLike],
        prompts: Sequence[str | None] | None = None,
    ) -> list[Reward]:
        """One Reward per solution (one sandbox batch call, one PRM call, concurrently)."""
        if len(tests) != len(solutions) or (prompts is not None and len(prompts) != len(solutions)):
            raise ValueError("solutions, tests and prompts must have the same length")
        prompts = list(prompts) if prompts is not None else [None] * len(solutions)
        for i, solution in enumerate(solutions):
            if not isinstance(solution, str):
                raise ValueError(f"solution {i} is a {type(solution).__name__}, not a string")
        specs: list[TestSpec] = [parse_tests(t) for t in tests]
        programs = [self.program(s, p) for s, p in zip(solutions, prompts, strict=True)]
        if self.config.prm_url is not None and None in prompts:
            i = prompts.index(None)
            raise ValueError(f"the PRM scores a program given its prompt: no prompt for solution {i}")
        if not solutions:
            return []
        sandbox, prm, pool = self._clients()
        prm_future: Future[list[ItemScore]] | None = None
        if prm is not None:
            items = [(p or "", self.code(s)) for s, p in zip(solutions, prompts, strict=True)]
            prm_future = pool.submit(prm.score, items, self.config.prm_aggregate)
        timeout = self.config.run_timeout_s
        requests = [RunRequest(code, spec, timeout) for code, spec in zip(programs, specs, strict=True)]
        try:
            results = sandbox.run_batch(requests)
        except SandboxError as error:
            if prm_future is not None:
                prm_future.cancel()
            raise RewardError(f"sandbox at {self.config.sandbox_url}: {error}") from error
        prm_scores: list[ItemScore | None] = [None] * len(programs)
        if prm_future is not None:
            try:
                prm_scores = list(prm_future.result())
            except PrmError as error:
                raise RewardError(f"PRM at {self.config.prm_url}: {error}") from error
        return [self._reward(r, s) for r, s in zip(results, prm_scores, strict=True)]

    def _reward(self, result: RunResult, item: ItemScore | None) -> Reward:
        score = 1.0 if result.passed else 0.0
        prm, lines = None, 0
        if item is not None:
            prm = item.score
            lines = sum(line.score is not None for line in item.lines)
            if prm is not None:
                score += self.config.prm_weight * prm
        return Reward(
            score, result.passed, str(result.status), result.tests_passed, result.tests_total, prm, lines
        )

    def close(self) -> None:
        with self._lock:
            if self._sandbox is not None:
                self._sandbox.close()
            if self._prm is not None:
                self._prm.close()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._sandbox = self._prm = self._pool = None


# ------------------------------------------------------------------------------------------- verl

_SCORERS: dict[tuple[int, RewardConfig], RewardScorer] = {}
_SCORERS_LOCK = threading.Lock()
_CONFIG_FIELDS = frozenset(ENV)


def _env_scorer(kwargs: Mapping[str, Any]) -> RewardScorer:
    """The scorer of this process for the environment + `kwargs` that name RewardConfig fields
    (verl merges `custom_reward_function.reward_kwargs` into the call's kwargs)."""
    config = RewardConfig.from_env(**{k: v for k, v in kwargs.items() if k in _CONFIG_FIELDS})
    key = (os.getpid(), config)  # a forked child builds its own HTTP clients
    with _SCORERS_LOCK:
        scorer = _SCORERS.get(key)
        if scorer is None:
            scorer = _SCORERS[key] = RewardScorer(config)
        return scorer


def _verl_prompt(extra_info: Any) -> str | None:
    if not isinstance(extra_info, Mapping):
        return None
    for key in ("prompt", "question"):
        value = extra_info.get(key)
        if isinstance(value, str):
            return value
    return None


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """verl's custom reward function (`custom_reward_function.path` = a file exposing it,
    `custom_reward_function.name=compute_score`). verl calls it once per response as
    `compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`.

    ground_truth: the tests, any shape `services.client.testspec.parse_tests` accepts (for a
    parquet column, JSON text of a mapping is the safe choice). data_source is not used: the tests
    decide. extra_info["prompt"] (else extra_info["question"]): the prompt text, needed for the PRM
    and for PSGPO_PREPEND_PROMPT. Keyword arguments named like RewardConfig fields (verl's
    `custom_reward_function.reward_kwargs`) override the environment; others (verl adds e.g.
    `reward_router_address`) are ignored.

    Returns {"score", "acc", "tests_passed", "tests_total", "sandbox_status"} plus
    {"prm_score", "prm_lines"} when a PRM is configured. Raises RewardError when a service call
    fails (verl then fails the step; see docs/clients.md).
    """
    scorer = _env_scorer(kwargs)
    (reward,) = scorer.score([solution_str], [ground_truth], [_verl_prompt(extra_info)])
    return reward.as_dict(scorer.config.prm_url is not None)


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """verl's `batch` reward manager form (`reward_model.reward_manager=batch`): the same as
    `compute_score` for every item, with one sandbox batch call and one PRM call."""
    scorer = _env_scorer(kwargs)
    infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
    prompts = [_verl_prompt(info) for info in infos]
    rewards = scorer.score(list(solution_strs), list(ground_truths), prompts)
    return [r.as_dict(scorer.config.prm_url is not None) for r in rewards]


# -------------------------------------------------------------------------------------------- TRL


def _content(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        )
    raise ValueError(f"unsupported message content of type {type(content).__name__}")


def _message_text(value: Any, role: str) -> str:
    """A standard-format string as is; for a conversational list of messages, the content of the
    last message with `role` (else of the last message)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or not value or not all(isinstance(m, Mapping) for m in value):
        raise ValueError(f"expected a string or a list of chat messages, got {type(value).__name__}")
    chosen = next((m for m in reversed(value) if m.get("role") == role), value[-1])
    return _content(chosen.get("content", ""))


class PsgpoTrlReward:
    """A TRL GRPOTrainer reward function (build it with `make_trl_reward`). A callable class, not a
    closure, so it pickles (TRL's async GRPO sends reward functions to a spawned process)."""

    __name__ = "psgpo_unit_tests"  # TRL logs rewards/<__name__>/mean

    def __init__(self, config: RewardConfig, tests_column: str = "tests"):
        self.config = config
        self.tests_column = tests_column
        self.scorer = RewardScorer(config)

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        """GRPOTrainer calls `reward(prompts=..., completions=..., completion_ids=..., trainer_state=...,
        log_extra=..., log_metric=..., **columns)`, every dataset column but "prompt" as a list with
        one value per completion. Strings or chat-message lists are both accepted. A row whose tests
        value is None gets None (TRL ignores that function for the row); a failed service call
        raises RewardError."""
        if self.tests_column not in kwargs:
            columns = sorted(
                k for k in kwargs if k not in ("completion_ids", "trainer_state", "log_extra", "log_metric")
            )
            raise ValueError(f"no dataset column {self.tests_column!r} among the reward kwargs {columns}")
        tests = list(kwargs[self.tests_column])
        if not len(prompts) == len(completions) == len(tests):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(tests)} tests")
        rows = [i for i, t in enumerate(tests) if t is not None]
        texts = [_message_text(completions[i], "assistant") for i in rows]
        asks = [_message_text(prompts[i], "user") for i in rows]
        rewards = self.scorer.score(texts, [tests[i] for i in rows], asks)
        out: list[float | None] = [None] * len(completions)
        for i, reward in zip(rows, rewards, strict=True):
            out[i] = reward.score
        log_metric, log_extra = kwargs.get("log_metric"), kwargs.get("log_extra")
        if callable(log_metric) and rewards:
            log_metric("psgpo/pass_rate", sum(r.passed for r in rewards) / len(rewards))
        if callable(log_extra):
            status = {i: r.status for i, r in zip(rows, rewards, strict=True)}
            log_extra("psgpo_status", [status.get(i, "no tests") for i in range(len(completions))])
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "tests_column": self.tests_column}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state["tests_column"])  # type: ignore[misc]

    def close(self) -> None:
        self.scorer.close()


def make_trl_reward(
    sandbox_url: str,
    tests_column: str = "tests",
    prm_url: str | None = None,
    prm_weight: float = 0.0,
    *,
    sandbox_token: str | None = None,
    prm_token: str | None = None,
    prm_aggregate: str = "min",
    extract_code: bool = True,
    prepend_prompt: bool = False,
    run_timeout_s: float | None = None,
    http_timeout_s: float = 300.0,
    retries: int = 3,
) -> PsgpoTrlReward:
    """A reward function for `GRPOTrainer(reward_funcs=[...])`: unit tests from the dataset column
    `tests_column` (any shape `parse_tests` accepts) run in the sandbox at `sandbox_url`, plus
    `prm_weight` x the PRM aggregate when `prm_url` is given. See RewardConfig for the rest."""
    config = RewardConfig(
        sandbox_url=sandbox_url,
        sandbox_token=sandbox_token,
        prm_url=prm_url,
        prm_token=prm_token,
        prm_weight=prm_weight,
        prm_aggregate=prm_aggregate,
        extract_code=extract_code,
        prepend_prompt=prepend_prompt,
        run_timeout_s=run_timeout_s,
        http_timeout_s=http_timeout_s,
        retries=retries,
    )
    return PsgpoTrlReward(config, tests_column)


# --------------------------------------------------------------------------------------- OpenRLHF

PROBE_PROMPT = "def add(a, b):\n"
PROBE_RESPONSE = "    return a + b\n"


def check_openrlhf_reward_url(url: str, *, token: str | None = None, timeout_s: float = 30.0) -> list[float]:
    """POSTs one probe the way OpenRLHF's remote reward client does (`{"query": [prompt + response],
    "prompts": [prompt], "labels": [""]}`) and checks the reply is `{"rewards": [one finite number],
    ...}` (with "scores" of the same length and "extra_logs" an object when present). Returns the
    rewards; RewardError says what is wrong otherwise. For the PRM service the URL is
    http://HOST:8001/get_reward."""
    payload = {"query": [PROBE_PROMPT + PROBE_RESPONSE], "prompts": [PROBE_PROMPT], "labels": [""]}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(url, json=payload, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise RewardError(f"{url}: unreachable ({type(error).__name__}: {error})") from error
    if response.status_code != 200:
        raise RewardError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
    try:
        body = response.json()
    except ValueError:
        raise RewardError(f"{url}: the reply is not JSON: {response.text[:300]!r}") from None
    if not isinstance(body, dict) or not isinstance(body.get("rewards"), list):
        raise RewardError(f"{url}: the reply has no 'rewards' list: {str(body)[:300]}")
    rewards = body["rewards"]
    if len(rewards) != 1 or not all(_finite(r) for r in rewards):
        raise RewardError(f"{url}: expected one finite reward for one query, got {rewards!r}")
    if "scores" in body and (not isinstance(body["scores"], list) or len(body["scores"]) != len(rewards)):
        raise RewardError(f"{url}: 'scores' must be a list as long as 'rewards', got {body['scores']!r}")
    if "extra_logs" in body and not isinstance(body["extra_logs"], dict):
        raise RewardError(f"{url}: 'extra_logs' must be an object")
    return [float(r) for r in rewards]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.client.adapters check-openrlhf URL [--token T]`: exit 0 when URL speaks
    OpenRLHF's remote reward protocol."""
    parser = argparse.ArgumentParser(prog="python -m services.client.adapters")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-openrlhf", help="check a --remote_rm_url / --reward.remote_url")
    check.add_argument("url", help="e.g. http://127.0.0.1:8001/get_reward")
    check.add_argument("--token", default=None, help="bearer token (OpenRLHF itself sends none)")
    check.add_argument("--timeout", type=float, default=30.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        rewards = check_openrlhf_reward_url(args.url, token=args.token, timeout_s=args.timeout)
    except RewardError as error:
        print(f"not usable as an OpenRLHF remote reward URL: {error}", file=sys.stderr)
        return 1
    print(f"ok: {args.url} speaks OpenRLHF's remote reward protocol (probe reward {rewards[0]:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
