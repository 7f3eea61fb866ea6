"""Binary-search labelling of line prefixes (`psgpo label`): the PRM's training data.

PSGPO (arXiv 2410.17621) labels the line prefixes of a failed response: the prefix ending at line m is
*correct* when at least one of K completions sampled from it passes the unit tests. Assuming that once
a prefix is unrecoverable every longer one is too, a binary search over the T non-neutral lines finds
m*, the last correct prefix, with at most ceil(log2(T + 1)) <= ceil(log2 T) + 1 probes (K completions
each) instead of the T probes of labelling every prefix. Lines up to m* get +1, later non-neutral lines
-1, neutral lines (blank or comment-only, `services.common.lines`) null. m* = 0 (the empty prefix) is a
legitimate answer: every line is -1. A passing response is all +1 and costs no probe. A probe of line m
is a rollout task whose prompt is the prompt + the response through line m, newline included: the
sandbox runs that + each completion. `LastCorrectSearch` says what m* means when outcomes are not
monotone.

Read top to bottom:

1. the pure core: `LastCorrectSearch`, `binary_search_last_correct`, `brute_force_labels`, `labels_for`;
2. records and data strategies (`strategy_tags`, `select_records`);
3. the job (`LabelArgs`, `label`): probes travel as ordinary rollout tasks on run `<run>-label`, so any
   number of rollout workers share them; every probe result is cached before it is acknowledged, so a
   killed job resumes where it stopped and never probes a prefix twice;
4. `sample` (make the input by sampling a policy through the rollout workers) and `select` (write a
   training set with one data strategy).

docs/labelling.md has the formats, the cost figures and the commands.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from psgpo.v1.rollout_pb2 import SamplingParams, Task, Trajectory
from services.client.testspec import parse_tests, to_proto
from services.common import keys
from services.common.errors import UserError
from services.common.lines import Line, scored_lines, split_lines
from services.sandbox.model import TestSpec, tests_to_dict

log = logging.getLogger(__name__)

# =====================================================================================================
# 1. The pure core
# =====================================================================================================


class LastCorrectSearch:
    """Binary search for m*, the last correct prefix among the prefixes 1..T (ending at the m-th
    non-neutral line), written as a state machine so that a driver can keep many searches' probes in
    flight at once: `next_probe()` names the prefix to probe next (None once done), `record(m, ok)`
    feeds back its outcome, `m_star` is the answer.

    Invariant: prefix `lo` is correct (lo = 0, the empty prefix, is assumed correct and never probed)
    and prefix `hi` is incorrect (hi = T + 1 is a sentinel, never probed). Each probe halves hi - lo,
    so a search makes at most ceil(log2(T + 1)) probes and never the same one twice.

    Non-monotone outcomes (a correct prefix after an incorrect one) do not break the search: it still
    ends, and its m* is a *boundary*: prefix m* is correct or m* = 0, and prefix m* + 1 is incorrect or
    m* = T, both as probed. It is the boundary the bisection reaches, not necessarily the last correct
    prefix nor the one before the first incorrect prefix; lines <= m* are labelled +1 even where an
    unprobed prefix would have been judged incorrect.
    """

    def __init__(self, num_scored: int) -> None:
        if num_scored < 1:
            raise ValueError(f"a search needs at least one non-neutral line, got T={num_scored}")
        self.num_scored = num_scored
        self.lo = 0
        self.hi = num_scored + 1

    @property
    def done(self) -> bool:
        return self.hi - self.lo <= 1

    def next_probe(self) -> int | None:
        return None if self.done else (self.lo + self.hi) // 2

    def record(self, m: int, correct: bool) -> None:
        if m != self.next_probe():
            raise ValueError(f"expected the outcome of prefix {self.next_probe()}, got prefix {m}")
        if correct:
            self.lo = m
        else:
            self.hi = m

    @property
    def m_star(self) -> int:
        if not self.done:
            raise ValueError("the search is not finished")
        return self.lo


def binary_search_last_correct(
    num_scored: int, probe: Callable[[int], bool], memo: MutableMapping[int, bool] | None = None
) -> tuple[int, list[tuple[int, bool]]]:
    """(m*, probe_log): m* in 0..T as `LastCorrectSearch` defines it (read its docstring for
    non-monotone outcomes), probe_log the (m, correct) pairs the search consulted, in order.

    `probe(m)` judges the prefix ending at the m-th non-neutral line (1-based). `memo` maps m to known
    outcomes: they are used without calling `probe`, and new outcomes are added, so a second search
    with the same memo calls `probe` for nothing it already knows."""
    memo = {} if memo is None else memo
    search = LastCorrectSearch(num_scored)
    probe_log: list[tuple[int, bool]] = []
    while (m := search.next_probe()) is not None:
        if m not in memo:
            memo[m] = bool(probe(m))
        probe_log.append((m, memo[m]))
        search.record(m, memo[m])
    return search.m_star, probe_log


def probe_bound(num_scored: int) -> int:
    """The most probes one search may need: ceil(log2 T) + 1 (the search needs ceil(log2(T + 1)))."""
    return math.ceil(math.log2(num_scored)) + 1


def labels_for(response: str, m_star: int) -> dict[str, Any]:
    """The label fields of a record: `line_spans` (every line of `split_lines`, neutral ones too),
    `labels` (+1 up to the m*-th non-neutral line, -1 after it, None on neutral lines) and
    `first_bad_line` (index of the first -1 line, or None). m* = T labels every line +1."""
    lines = split_lines(response)
    num_scored = len(scored_lines(lines))
    if not 0 <= m_star <= num_scored:
        raise ValueError(f"m* must be in 0..{num_scored}, got {m_star}")
    labels: list[int | None] = []
    position = 0  # 1-based position among the non-neutral lines
    for line in lines:
        if line.neutral:
            labels.append(None)
            continue
        position += 1
        labels.append(1 if position <= m_star else -1)
    first_bad = next((i for i, label in enumerate(labels) if label == -1), None)
    return {
        "line_spans": [[line.start, line.end] for line in lines],
        "labels": labels,
        "first_bad_line": first_bad,
    }


def brute_force_labels(response: str, probe: Callable[[int], bool]) -> list[int | None]:
    """Linear labelling, for tests: every non-neutral line's own prefix probed (T probes), +1 when
    correct, -1 when not, None on neutral lines. On monotone outcomes it equals
    `labels_for(response, m*)["labels"]` of the binary search."""
    labels: list[int | None] = []
    position = 0
    for line in split_lines(response):
        if line.neutral:
            labels.append(None)
        else:
            position += 1
            labels.append(1 if probe(position) else -1)
    return labels


def prefix_text(response: str, line: Line) -> str:
    """The response up to the end of `line`, newline included (added when the response has none)."""
    return response[: line.end] + "\n"


# =====================================================================================================
# 2. Records and data strategies
# =====================================================================================================

STRATEGIES = ("full", "revised-only", "remove-hard", "medium-only")
Strategy = Literal["full", "revised-only", "remove-hard", "medium-only"]


def is_revised(record: Mapping[str, Any]) -> bool:
    """A failed response where the search found a correct prefix (m* >= 1)."""
    return not record["passed"] and 1 in record["labels"]


@dataclass(frozen=True)
class PromptStats:
    """What the labelled responses of one prompt (task_id) say about it."""

    responses: int
    passed: int
    revised: int

    @property
    def pass_rate(self) -> float:
        return self.passed / self.responses

    @property
    def hard(self) -> bool:
        """No sample passed and no correct prefix was found."""
        return self.passed == 0 and self.revised == 0

    def medium(self, low: float, high: float) -> bool:
        return low <= self.pass_rate <= high


def prompt_stats(records: Iterable[Mapping[str, Any]]) -> dict[str, PromptStats]:
    counts: dict[str, list[int]] = {}
    for record in records:
        c = counts.setdefault(record["task_id"], [0, 0, 0])
        c[0] += 1
        c[1] += bool(record["passed"])
        c[2] += is_revised(record)
    return {task_id: PromptStats(*c) for task_id, c in counts.items()}


def strategy_tags(record: Mapping[str, Any], stats: PromptStats, low: float, high: float) -> list[str]:
    """Response tag ("passed", "revised" or "unrecoverable") then prompt tags ("hard", "medium")."""
    tags = ["passed" if record["passed"] else "revised" if is_revised(record) else "unrecoverable"]
    if stats.hard:
        tags.append("hard")
    if stats.medium(low, high):
        tags.append("medium")
    return tags


def select_records(
    records: Sequence[Mapping[str, Any]], strategy: str, medium_low: float = 0.1, medium_high: float = 0.9
) -> list[Mapping[str, Any]]:
    """The records a data strategy keeps, computed from the records themselves (not their tags):

    - `full`: all of them;
    - `revised-only`: failed responses where a correct prefix was found (m* >= 1);
    - `remove-hard`: all but the prompts where no sample passed and no correct prefix was found;
    - `medium-only`: the prompts whose sample pass rate is in [medium_low, medium_high].
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} ({', '.join(STRATEGIES)})")
    stats = prompt_stats(records)
    if strategy == "revised-only":
        return [r for r in records if is_revised(r)]
    if strategy == "remove-hard":
        return [r for r in records if not stats[r["task_id"]].hard]
    if strategy == "medium-only":
        return [r for r in records if stats[r["task_id"]].medium(medium_low, medium_high)]
    return list(records)


def numbered_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSONL file; UserError naming the file and line of anything that is not
    a JSON object. Blank lines are skipped."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object")
            rows.append((number, row))
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in numbered_jsonl(path)]


def _open_appendable(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file that a killed job may have left with a partial last line: that line is cut
    off (it is redone) so that appending continues on a line boundary."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning(
            "%s: dropping a partial last line (%d bytes) left by an interrupted run", path, len(data) - keep
        )
        with open(path, "r+b") as f:
            f.truncate(keep)
    return read_jsonl(path)


# =====================================================================================================
# 3. The job
# =====================================================================================================


@dataclass
class LabelArgs:
    """Arguments of `psgpo label run` (each field is a flag: `--kebab-case`)."""

    input: Path | None = None
    """JSONL of sampled responses, one per line: {"task_id", "prompt", "response", "tests" (any shape
    services/client/testspec.py accepts, e.g. {"kind": "assert", "code": ...}), "checkpoint"?, "passed"?,
    "reference"?} (required; `psgpo label sample` writes it)."""
    out: Path = Path("runs/label/labels.jsonl")
    """Labelled JSONL (appended to); beside it <out>.probes.jsonl (probe cache) and <out>.report.json."""
    k: int = 4
    """Completions per probe: a prefix is correct when at least one of K passes the tests (1..1024)."""
    run: str = "default"
    """Base run name: probes go to run `<run>-label` (serve it with `psgpo serve rollout --run
    <run>-label`), so labelling traffic never mixes with a trainer's stream. One label job per run."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis of the rollout workers."""
    sandbox_url: str = "http://127.0.0.1:8002"
    """Sandbox HTTP URL; used only for rows without "passed" and for "reference" checks."""
    temperature: float = 1.0
    """Sampling temperature of the completions (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling of the completions (1: off)."""
    top_k: int = 0
    """Top-k sampling of the completions (0: off)."""
    max_new_tokens: int = 256
    """Longest completion, in tokens (1..32768)."""
    seed: int = 0
    """Sampling seed of every probe (0: fresh randomness)."""
    stop: str = "[]"
    """JSON list of stop strings of the completions, e.g. '["\\ndef "]'."""
    completion_policy: str = ""
    """A name for the policy the label workers serve; part of the probe-cache key, so change it when
    the workers change policy or cached outcomes of the old one are reused."""
    strategies: str = ""
    """Comma-separated data strategies (full, revised-only, remove-hard, medium-only): after labelling,
    write each one's training set to <out>.<strategy>.jsonl."""
    medium_low: float = 0.1
    """Lowest sample pass rate of a "medium" prompt (tag and medium-only strategy)."""
    medium_high: float = 0.9
    """Highest sample pass rate of a "medium" prompt."""
    resume: bool = True
    """Keep <out> and its probe cache: skip finished responses, reuse cached probes (--no-resume starts
    over and truncates both)."""
    consumer: str = "labeller"
    """Consumer name in the trajectories group of `<run>-label`; keep it stable across restarts."""
    max_inflight: int = 256
    """Probes in flight at once (each is one rollout task of K samples)."""
    max_lines: int = 2000
    """Responses with more lines are skipped (counted in the report)."""
    probe_timeout_s: float = 600.0
    """A probe without a complete result this long after it was submitted is submitted again."""
    probe_attempts: int = 3
    """Submissions of one probe (timeouts, completions the sandbox could not judge) before the job stops."""
    sandbox_timeout_s: float = 10.0
    """Time limit of each sandbox run of a response or reference."""


def label_run(run: str) -> str:
    return keys.validate_run(f"{run}-label")


def check_args(args: LabelArgs) -> list[str]:
    """The parsed stop strings; UserError (one line) for any absurd argument."""
    problems = []
    if args.input is None:
        problems.append("--input is required")
    if not 1 <= args.k <= 1024:
        problems.append(f"--k must be in 1..1024, got {args.k}")
    if not 1 <= args.max_new_tokens <= 32768:
        problems.append(f"--max-new-tokens must be in 1..32768, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0 or args.seed < 0:
        problems.append("--top-k and --seed must be >= 0")
    if not 1 <= args.max_inflight <= 100_000:
        problems.append(f"--max-inflight must be in 1..100000, got {args.max_inflight}")
    if args.max_lines < 1 or args.probe_attempts < 1:
        problems.append("--max-lines and --probe-attempts must be >= 1")
    if not (args.probe_timeout_s > 0 and args.sandbox_timeout_s > 0):
        problems.append("--probe-timeout-s and --sandbox-timeout-s must be > 0")
    if not 0 <= args.medium_low <= args.medium_high <= 1:
        problems.append("need 0 <= --medium-low <= --medium-high <= 1")
    for strategy in filter(None, args.strategies.split(",")):
        if strategy not in STRATEGIES:
            problems.append(f"unknown strategy {strategy!r} ({', '.join(STRATEGIES)})")
    try:
        label_run(args.run)
    except ValueError as exc:
        problems.append(f"--run: {exc} (the label run adds '-label')")
    try:
        stop = json.loads(args.stop)
    except json.JSONDecodeError:
        stop = None
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        problems.append(f"--stop must be a JSON list of non-empty strings, got {args.stop!r}")
    if problems:
        raise UserError("; ".join(problems))
    return stop


class LabelStopped(UserError):
    """The job cannot go on (an outage outlasted the retries); everything finished is saved."""


# ---- input ------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One input response."""

    where: str  # "path:line"
    task_id: str
    prompt: str
    response: str
    tests: TestSpec
    tests_json: dict[str, Any]  # the sandbox's JSON shape of `tests` (part of the probe key)
    checkpoint: str
    passed: bool | None  # None: the sandbox decides
    reference: str | None

    @property
    def identity(self) -> str:
        """Same identity = same record; duplicates in the input are counted, not merged."""
        return _sha([self.task_id, self.prompt, self.response, self.checkpoint])


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_rows(path: Path) -> list[Row]:
    rows: list[Row] = []
    prompts: dict[str, str] = {}
    for number, raw in numbered_jsonl(path):
        where = f"{path}:{number}"
        for name in ("task_id", "prompt", "response"):
            if not isinstance(raw.get(name), str):
                raise UserError(f"{where}: {name} must be a string")
        if not raw["task_id"] or not raw["prompt"].strip():
            raise UserError(f"{where}: task_id and prompt must be non-empty")
        try:
            tests = parse_tests(raw["tests"]) if "tests" in raw else None
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
        if tests is None:
            raise UserError(f"{where}: no tests")
        passed, reference = raw.get("passed"), raw.get("reference")
        if passed is not None and not isinstance(passed, bool):
            raise UserError(f"{where}: passed must be true or false")
        if reference is not None and not isinstance(reference, str):
            raise UserError(f"{where}: reference must be a string")
        if prompts.setdefault(raw["task_id"], raw["prompt"]) != raw["prompt"]:
            raise UserError(f"{where}: task {raw['task_id']!r} appears with two different prompts")
        rows.append(
            Row(where, raw["task_id"], raw["prompt"], raw["response"], tests, tests_to_dict(tests),
                str(raw.get("checkpoint", "")), passed, reference)
        )  # fmt: skip
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


# ---- the probe cache --------------------------------------------------------------------------------


@dataclass
class Submission:
    task_id: str
    attempt: int
    at: float  # wall clock (time.time()) of the submission


class ProbeCache:
    """Append-only JSONL beside the output: what a restarted job must not redo.

        {"probe": KEY, "k": int, "passed": int}        a probe's outcome (k completions judged)
        {"probe": KEY, "error": str}                   a probe the workers refused (e.g. too long)
        {"submitted": KEY, "task_id": str, "attempt": int, "at": float}   a probe task in flight
        {"verdict": KEY, "passed": bool}               a sandbox run of a response or reference

    A probe KEY is the sha256 of (prompt + prefix, K, sampling, tests, completion_policy).
    """

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.results: dict[str, tuple[int, int]] = {}  # key -> (k judged, passed)
        self.errors: dict[str, str] = {}
        self.submitted: dict[str, Submission] = {}
        self.verdicts: dict[str, bool] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            path.write_text("")
        for row in _open_appendable(path):
            if "probe" in row and "error" in row:
                self.errors[row["probe"]] = row["error"]
            elif "probe" in row:
                self.results[row["probe"]] = (int(row["k"]), int(row["passed"]))
            elif "submitted" in row:
                self.submitted[row["submitted"]] = Submission(row["task_id"], int(row["attempt"]), row["at"])
            elif "verdict" in row:
                self.verdicts[row["verdict"]] = bool(row["passed"])
        self.loaded = set(self.results) | set(self.errors)  # answered by an earlier run
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def _append(self, rows: Sequence[dict[str, Any]]) -> None:
        # One write + flush: a killed process loses at most the line being written (cut on reload).
        self._file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._file.flush()

    def add_result(self, key: str, k: int, passed: int) -> None:
        self.results[key] = (k, passed)
        self._append([{"probe": key, "k": k, "passed": passed}])

    def add_error(self, key: str, error: str) -> None:
        self.errors[key] = error
        self._append([{"probe": key, "error": error}])

    def add_submitted(self, entries: Sequence[tuple[str, Submission]]) -> None:
        self.submitted.update(entries)
        self._append(
            [{"submitted": k, "task_id": s.task_id, "attempt": s.attempt, "at": s.at} for k, s in entries]
        )

    def add_verdicts(self, verdicts: Mapping[str, bool]) -> None:
        self.verdicts.update(verdicts)
        self._append([{"verdict": key, "passed": passed} for key, passed in verdicts.items()])

    def close(self) -> None:
        self._file.close()


# ---- sandbox verdicts of responses and references ---------------------------------------------------


def _verdict_key(program: str, tests: Mapping[str, Any]) -> str:
    return _sha(["verdict", program, tests])


def settle_verdicts(rows: Sequence[Row], args: LabelArgs, cache: ProbeCache) -> tuple[set[str], int]:
    """Sets `passed` of the rows without one and checks the "reference" solutions, in the sandbox
    (cached verdicts first; the sandbox runs prompt + program, as the rollout workers do). Returns
    (tasks whose reference fails its tests, sandbox runs made). An outage stops the job with one line."""
    from services.sandbox.client import RunRequest, SandboxClient, SandboxError

    def key(row: Row, program: str) -> str:
        return _verdict_key(row.prompt + program, row.tests_json)

    programs: dict[str, tuple[str, TestSpec]] = {}
    for row in rows:
        if row.passed is None:
            programs[key(row, row.response)] = (row.prompt + row.response, row.tests)
        if row.reference is not None:
            programs[key(row, row.reference)] = (row.prompt + row.reference, row.tests)
    todo = [(k, code, tests) for k, (code, tests) in programs.items() if k not in cache.verdicts]
    if todo:
        with SandboxClient(args.sandbox_url, timeout_s=max(120.0, 4 * args.sandbox_timeout_s)) as sandbox:
            for start in range(0, len(todo), 32):
                chunk = todo[start : start + 32]
                try:
                    results = sandbox.run_batch(
                        [RunRequest(c, t, args.sandbox_timeout_s) for _, c, t in chunk]
                    )
                except SandboxError as exc:
                    raise LabelStopped(
                        f"sandbox at {args.sandbox_url} failed ({exc}); rerun the same command to resume"
                    ) from None
                cache.add_verdicts(
                    {k: result.passed for (k, _, _), result in zip(chunk, results, strict=True)}
                )
    for row in rows:
        if row.passed is None:
            row.passed = cache.verdicts[key(row, row.response)]
    bad = {
        row.task_id
        for row in rows
        if row.reference is not None and not cache.verdicts[key(row, row.reference)]
    }
    return bad, len(todo)


# ---- probes through the rollout task stream ---------------------------------------------------------


@dataclass
class _Search:
    """One failed response under binary search."""

    row: Row
    scored: list[Line]  # its non-neutral lines: prefix m ends at scored[m - 1]
    search: LastCorrectSearch
    probes: list[dict[str, int]] = field(default_factory=list)  # the record's "probes", in order


@dataclass
class _Probe:
    """One distinct prefix being probed: the searches waiting for it and the samples that came back."""

    key: str
    task: Task | None  # None until a search of this run asks for a probe an earlier run submitted
    attempt: int
    deadline: float  # wall clock
    waiters: list[tuple[_Search, int]] = field(default_factory=list)
    samples: dict[str, dict[int, Trajectory]] = field(default_factory=dict)  # task_id -> index -> traj
    deliveries: list[Any] = field(default_factory=list)  # held until the outcome is cached, then acked


@dataclass
class RunCounters:
    """What this invocation did (the report's "this_run")."""

    probe_tasks: int = 0  # probe tasks submitted, retries included
    retries: int = 0
    probes_from_earlier_runs: int = 0  # consulted outcomes cached by an earlier run
    probes_shared: int = 0  # consulted outcomes another search of this run already asked for
    verdict_runs: int = 0  # sandbox runs of responses without "passed" and of references
    foreign_trajectories: int = 0  # trajectories of the label run that no probe of this run waits for
    skipped: Counter[str] = field(default_factory=Counter)


class Prober:
    """Drives every failed response's binary search at once. Each distinct prefix is one rollout task
    (prompt + prefix, n = K, no PRM) on run `<run>-label`; up to `max_inflight` are in flight; searches
    that ask for a prefix already asked for (or cached) share its outcome. An outcome is written to
    the probe cache before its trajectories are acknowledged."""

    def __init__(self, args: LabelArgs, stop: list[str], r: Any, cache: ProbeCache, counters: RunCounters):
        from services.common.streams import trajectory_consumer

        self.args, self.r, self.cache, self.counters = args, r, cache, counters
        self.run = label_run(args.run)
        self.sampling_json = {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "stop": stop,
        }
        self.sampling = SamplingParams(**self.sampling_json)
        self.consumer = trajectory_consumer(r, self.run, args.consumer)
        self.inflight: dict[str, _Probe] = {}
        self.ready: deque[_Search] = deque()  # searches whose next probe is not asked yet
        self.to_submit: list[_Probe] = []
        self.asked_this_run: set[str] = set()
        self.active = 0  # searches not finished
        self.done: Callable[[_Search, int | None, str | None], None] = lambda s, m_star, why: None

    def probe_key(self, s: _Search, m: int) -> tuple[str, str]:
        prompt = s.row.prompt + prefix_text(s.row.response, s.scored[m - 1])
        key = _sha([prompt, self.args.k, self.sampling_json, s.row.tests_json, self.args.completion_policy])
        return key, prompt

    def run_searches(
        self, searches: Sequence[_Search], done: Callable[[_Search, int | None, str | None], None]
    ) -> None:
        """Until every search has finished: `done(search, m_star, None)` or `done(search, None, why)`.

        The first `_advance` re-registers every probe an earlier run left in flight that a search still
        needs (the searches replay their cached outcomes up to it), before anything is read."""
        from services.common.streams import with_backoff

        self.done = done
        self.active = len(searches)
        self.ready.extend(searches)
        while True:
            self._advance()
            if not self.active:
                return
            self._submit()
            self._collect(with_backoff(self._read, what="read trajectories"))
            self._expire()

    def _read(self) -> list[Any]:
        import redis

        try:
            return self.consumer.read(count=512, block_ms=500)
        except (redis.ConnectionError, redis.TimeoutError):
            self.consumer.rewind()  # entries delivered in a lost reply come back as our own pending ones
            raise

    # -- asking ------------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Moves every ready search to its next probe: answered from the cache at once, joined to a
        probe in flight, or a new probe (if fewer than max_inflight are in flight; else it waits)."""
        waiting: deque[_Search] = deque()
        while self.ready:
            s = self.ready.popleft()
            m = s.search.next_probe()
            if m is None:
                self._finish(s, s.search.m_star, None)
                continue
            key, prompt = self.probe_key(s, m)
            if key in self.cache.errors:
                self._finish(s, None, f"probe refused: {self.cache.errors[key]}")
                continue
            if key in self.cache.results:
                self._count_consulted(key)
                self._consult(s, m, key)
                self.ready.append(s)
                continue
            probe = self.inflight.get(key) or self._resumed(key)
            if probe is None:
                if len(self.inflight) >= self.args.max_inflight:
                    waiting.append(s)
                    continue
                probe = self.inflight[key] = _Probe(key, self._task(prompt, s.row, key), 0, math.inf)
                self._queue(probe)
            elif probe.task is None:  # an earlier run's probe: rebuilt, so that it can be sent again
                probe.task = self._task(prompt, s.row, key)
            self._count_consulted(key)
            probe.waiters.append((s, m))
        self.ready = waiting

    def _count_consulted(self, key: str) -> None:
        if key in self.cache.loaded:
            self.counters.probes_from_earlier_runs += 1
        elif key in self.asked_this_run:
            self.counters.probes_shared += 1
        self.asked_this_run.add(key)

    def _consult(self, s: _Search, m: int, key: str) -> None:
        k, passed = self.cache.results[key]
        line = s.scored[m - 1]
        prefix_chars = min(line.end + 1, len(s.row.response))
        s.probes.append({"line": line.index, "prefix_chars": prefix_chars, "k": k, "passed": passed})
        s.search.record(m, passed > 0)

    def _finish(self, s: _Search, m_star: int | None, why: str | None) -> None:
        self.active -= 1
        self.done(s, m_star, why)

    def _resumed(self, key: str) -> _Probe | None:
        """A probe an earlier run submitted and did not see answered: await its trajectories (its
        task is rebuilt by the caller, to be sent again if it times out)."""
        sub = self.cache.submitted.get(key)
        if sub is None:
            return None
        probe = self.inflight[key] = _Probe(key, None, sub.attempt, sub.at + self.args.probe_timeout_s)
        return probe

    def _task(self, prompt: str, row: Row, key: str) -> Task:
        return Task(
            schema_version=keys.SCHEMA_VERSION,
            prompt=prompt,
            tests=to_proto(row.tests),
            n=self.args.k,
            sampling=self.sampling,
            score_with_prm=False,
            metadata={"label_key": key},
        )

    def _queue(self, probe: _Probe) -> None:
        """Next attempt of `probe` under a fresh task id (a task id is used once per run)."""
        assert probe.task is not None
        probe.attempt += 1
        probe.task.task_id = f"probe-{probe.key[:20]}-{probe.attempt}-{uuid.uuid4().hex[:8]}"
        probe.deadline = math.inf  # until it is submitted
        self.to_submit.append(probe)

    def _submit(self) -> None:
        """Enqueues the queued probes in one transaction, then records them as submitted."""
        from services.common.streams import enqueue_tasks, with_backoff

        if not self.to_submit:
            return
        batch, self.to_submit = self.to_submit, []
        tasks = [p.task for p in batch if p.task is not None]  # every queued probe has its task
        with_backoff(lambda: enqueue_tasks(self.r, self.run, tasks), what="enqueue probes")
        now = time.time()
        for p in batch:
            p.deadline = now + self.args.probe_timeout_s
        self.cache.add_submitted([(t.metadata["label_key"], Submission(t.task_id, p.attempt, now))
                                  for p, t in zip(batch, tasks, strict=True)])  # fmt: skip
        self.counters.probe_tasks += len(batch)

    # -- answers -----------------------------------------------------------------------------------

    def _collect(self, deliveries: Sequence[Any]) -> None:
        useless = []
        touched: dict[str, _Probe] = {}
        for d in deliveries:
            traj: Trajectory = d.message
            key = traj.metadata.get("label_key", "")
            if key in self.cache.results or key in self.cache.errors:
                useless.append(d)  # a late copy, or the other attempt of a resolved probe
                continue
            probe = self.inflight.get(key)
            if probe is None:  # not a probe of this run, or an earlier run's that no search needs now
                self.counters.foreign_trajectories += 1
                useless.append(d)
                continue
            probe.samples.setdefault(traj.task_id, {})[traj.sample_index] = traj
            probe.deliveries.append(d)
            touched[key] = probe
        if useless:
            self.consumer.ack(*useless)
        for probe in touched.values():
            self._settle(probe)

    def _settle(self, probe: _Probe) -> None:
        """Caches the outcome of the first complete task of `probe`, acknowledges its trajectories and
        wakes its searches. A task the sandbox could not judge counts as a failed attempt."""
        for task_id, samples in probe.samples.items():
            refused = [f.reason for t in samples.values() for f in t.failures if f.component == "task"]
            if refused:
                self.cache.add_error(probe.key, refused[0])
                self._resolve(probe)
                return
            if len(samples) < self.args.k:
                continue
            judged = [t for t in samples.values() if t.HasField("verdict")]
            passed = sum(t.verdict.passed for t in judged)
            if passed or len(judged) == len(samples):  # one pass decides, even if others were not judged
                self.cache.add_result(probe.key, len(judged), passed)
                self._resolve(probe)
                return
            reasons = sorted({f.reason for t in samples.values() for f in t.failures})
            del probe.samples[task_id]
            self._retry(probe, f"the sandbox could not judge its completions ({'; '.join(reasons)})")
            return

    def _resolve(self, probe: _Probe) -> None:
        del self.inflight[probe.key]
        if probe.deliveries:
            self.consumer.ack(*probe.deliveries)  # only now: the outcome is in the cache
        for s, m in probe.waiters:
            if probe.key in self.cache.errors:
                self._finish(s, None, f"probe refused: {self.cache.errors[probe.key]}")
            else:
                self._consult(s, m, probe.key)
                self.ready.append(s)

    def _retry(self, probe: _Probe, why: str) -> None:
        if probe.attempt >= self.args.probe_attempts:
            raise LabelStopped(
                f"a probe of task {probe.waiters[0][0].row.task_id} failed {probe.attempt} times: {why}. "
                f"Are rollout workers serving run '{self.run}' (psgpo serve rollout --run {self.run} ...) "
                f"with a working sandbox? Finished work is saved in {self.args.out} and its probe cache: "
                "rerun the same command to resume"
            )
        self.counters.retries += 1
        log.warning("probe %s attempt %d: %s; submitting it again", probe.key[:12], probe.attempt, why)
        self._queue(probe)

    def _expire(self) -> None:
        now = time.time()
        for probe in [p for p in self.inflight.values() if p.deadline <= now]:
            self._retry(probe, f"no complete result within {self.args.probe_timeout_s:g}s")


# ---- the job ----------------------------------------------------------------------------------------


def _record(row: Row, m_star: int, probes: list[dict[str, int]]) -> dict[str, Any]:
    passed = bool(row.passed)
    return {
        "task_id": row.task_id,
        "prompt": row.prompt,
        "response": row.response,
        "checkpoint": row.checkpoint,
        "passed": passed,
        **labels_for(row.response, m_star),
        "probes": probes,
        "strategy_tags": [],  # set when the prompt's last response is done
    }


class RecordWriter:
    """Appends finished records to <out>, a prompt (task_id) at a time once all its responses are done,
    so that its prompt-level tags ("hard", "medium") see all of them."""

    def __init__(
        self, path: Path, existing: list[dict[str, Any]], outstanding: Counter[str], args: LabelArgs
    ):
        self.path, self.args = path, args
        self.by_task: dict[str, list[dict[str, Any]]] = {}
        for record in existing:
            self.by_task.setdefault(record["task_id"], []).append(record)
        self.outstanding = outstanding  # responses of each task this run still has to finish
        self.new: dict[str, list[dict[str, Any]]] = {}
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def finish(self, task_id: str, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.new.setdefault(task_id, []).append(record)
        self.outstanding[task_id] -= 1
        if self.outstanding[task_id] == 0:
            self._write(task_id)

    def _write(self, task_id: str) -> None:
        new = self.new.pop(task_id, [])
        if not new:
            return
        everything = self.by_task.setdefault(task_id, []) + new
        stats = prompt_stats(everything)[task_id]
        for record in new:
            record["strategy_tags"] = strategy_tags(
                record, stats, self.args.medium_low, self.args.medium_high
            )
        self.by_task[task_id] = everything
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _warn_without_workers(r: Any, run: str) -> None:
    import redis

    try:
        consumers = r.xinfo_consumers(keys.run_keys(run).tasks, keys.TASKS_GROUP)
    except redis.ResponseError:  # no stream or group yet: no worker ever joined
        consumers = []
    if not consumers:
        log.warning(
            "no rollout worker has joined run %s yet: probes wait until one does (psgpo serve rollout "
            "--run %s --policy DIR --redis URL --sandbox HOST:PORT)",
            run,
            run,
        )


def unfinished(rows: Sequence[Row], existing: Sequence[Mapping[str, Any]]) -> list[Row]:
    """The rows an earlier run did not finish (identical rows are counted: duplicates stay duplicates)."""
    finished = Counter(_sha([r["task_id"], r["prompt"], r["response"], r["checkpoint"]]) for r in existing)
    todo = []
    for row in rows:
        if finished[row.identity] > 0:
            finished[row.identity] -= 1
        else:
            todo.append(row)
    return todo


def unusable(row: Row, max_lines: int) -> str | None:
    lines = split_lines(row.response)
    if not scored_lines(lines):
        return "no_scored_lines"
    if len(lines) > max_lines:
        return "too_many_lines"
    return None


def _label_rows(
    args: LabelArgs,
    stop: list[str],
    rows: list[Row],
    existing: list[dict[str, Any]],
    out: Path,
    cache: ProbeCache,
) -> tuple[set[str], RunCounters]:
    """The body of `label`: verdicts, then every failed response's search; records appended to `out`."""
    import redis
    from tqdm.auto import tqdm

    from services.common.streams import connect

    counters = RunCounters()
    todo = unfinished(rows, existing)
    counters.skipped["already_done"] = len(rows) - len(todo)
    skip_reason = {i: why for i, row in enumerate(todo) if (why := unusable(row, args.max_lines))}
    usable = [row for i, row in enumerate(todo) if i not in skip_reason]
    bad_reference, counters.verdict_runs = settle_verdicts(usable, args, cache)
    if bad_reference:
        log.warning(
            "reference solutions fail their tests, tasks skipped: %s", ", ".join(sorted(bad_reference))
        )

    writer = RecordWriter(out, existing, Counter(row.task_id for row in todo), args)
    progress = tqdm(total=len(todo), desc="label", unit="resp", dynamic_ncols=True)

    def finish(row: Row, record: dict[str, Any] | None, skipped: str = "") -> None:
        if skipped:
            counters.skipped[skipped] += 1
        writer.finish(row.task_id, record)
        progress.update()

    def done(s: _Search, m_star: int | None, why: str | None) -> None:
        if m_star is None:
            log.warning("%s skipped: %s", s.row.where, why)
            finish(s.row, None, "probe_refused")
        else:
            finish(s.row, _record(s.row, m_star, s.probes))

    searches: list[_Search] = []
    try:
        for i, row in enumerate(todo):
            scored = scored_lines(split_lines(row.response))
            if i in skip_reason or row.task_id in bad_reference:
                finish(row, None, skip_reason.get(i, "bad_reference"))
            elif row.passed:  # a passing response is all +1 and costs no probe
                finish(row, _record(row, len(scored), []))
            else:
                searches.append(_Search(row, scored, LastCorrectSearch(len(scored))))
        if searches:
            try:
                r = connect(args.redis_url)
                r.ping()
            except (redis.RedisError, ValueError) as exc:
                raise UserError(f"cannot reach Redis at {args.redis_url}: {exc}") from None
            _warn_without_workers(r, label_run(args.run))
            try:
                Prober(args, stop, r, cache, counters).run_searches(searches, done)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise LabelStopped(
                    f"Redis at {args.redis_url} unreachable ({exc}); finished work is saved in {out} and "
                    "its probe cache: rerun the same command to resume"
                ) from None
            finally:
                r.close()
    finally:
        progress.close()
        writer.close()
    return bad_reference, counters


def label(args: LabelArgs) -> dict[str, Any]:
    """Label every response of `args.input` (see the module docstring); returns the cost report, also
    printed and written to <out>.report.json."""
    stop = check_args(args)
    assert args.input is not None
    started = time.monotonic()
    rows = load_rows(args.input)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.resume and out.exists():
        out.write_text("")
    existing = _open_appendable(out)
    cache = ProbeCache(Path(f"{out}.probes.jsonl"), args.resume)
    try:
        bad_reference, counters = _label_rows(args, stop, rows, existing, out, cache)
    finally:
        cache.close()

    records = read_jsonl(out) if out.exists() else []
    for strategy in filter(None, args.strategies.split(",")):
        chosen = select_records(records, strategy, args.medium_low, args.medium_high)
        _write_jsonl(Path(f"{out}.{strategy}.jsonl"), chosen)
    report = cost_report(records, args.k, counters, sorted(bad_reference), time.monotonic() - started)
    Path(f"{out}.report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, out)
    return report


def _write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def cost_report(
    records: Sequence[Mapping[str, Any]],
    k: int,
    counters: RunCounters,
    bad_reference: list[str],
    seconds: float,
) -> dict[str, Any]:
    """Completions the searches consulted per failed response, against K*T of labelling every prefix
    and the bound K*(ceil(log2 T) + 1) (over the whole output); what this run generated (after sharing
    and the cache) and its sandbox runs."""
    failed = [r for r in records if not r["passed"]]
    t_of = [sum(label is not None for label in r["labels"]) for r in failed]
    consulted = sum(p["k"] for r in failed for p in r["probes"])
    probes = sum(len(r["probes"]) for r in failed)
    linear = sum(k * t for t in t_of)
    bound = sum(k * probe_bound(t) for t in t_of)
    generated = k * counters.probe_tasks
    n = max(1, len(failed))
    return {
        "k": k,
        "records": len(records),
        "passed": len(records) - len(failed),
        "failed": len(failed),
        "revised": sum(is_revised(r) for r in failed),
        "probes": probes,
        "completions": consulted,
        "linear_completions": linear,
        "bound_completions": bound,
        "per_failed_response": {
            "probes": probes / n,
            "completions": consulted / n,
            "linear_completions": linear / n,
            "bound_completions": bound / n,
        },
        "completions_vs_linear": consulted / linear if linear else None,
        "this_run": {
            "probe_tasks": counters.probe_tasks,
            "retries": counters.retries,
            "completions_generated": generated,
            "sandbox_runs": generated + counters.verdict_runs,
            "verdict_runs": counters.verdict_runs,
            "probes_from_earlier_runs": counters.probes_from_earlier_runs,
            "probes_shared": counters.probes_shared,
            "foreign_trajectories": counters.foreign_trajectories,
            "skipped": {why: n for why, n in sorted(counters.skipped.items()) if n},
            "bad_reference_tasks": bad_reference,
            "seconds": round(seconds, 3),
        },
    }


def print_report(report: Mapping[str, Any], out: Path) -> None:
    per, run = report["per_failed_response"], report["this_run"]
    print(
        f"label: {report['records']} records in {out} ({report['passed']} passed, {report['failed']} failed, "
        f"{report['revised']} revised)\n"
        f"  per failed response: {per['probes']:.2f} probes, {per['completions']:.1f} completions "
        f"(labelling every prefix: {per['linear_completions']:.1f}; bound K*(ceil(log2 T)+1): "
        f"{per['bound_completions']:.1f})\n"
        f"  this run: {run['probe_tasks']} probe tasks ({run['retries']} retries), "
        f"{run['completions_generated']} completions generated, {run['sandbox_runs']} sandbox runs, "
        f"{run['probes_shared']} probes shared, {run['probes_from_earlier_runs']} from the cache of an "
        f"earlier run; skipped {run['skipped'] or 'none'}\n"
        f"  report: {out}.report.json",
        flush=True,
    )


# =====================================================================================================
# 4. Making the input (`sample`) and a training set (`select`)
# =====================================================================================================


@dataclass
class SampleArgs:
    """Arguments of `psgpo label sample`: responses of the policy the rollout workers of `<run>-sample`
    serve, with their verdicts, in the input format of `psgpo label run`."""

    tasks: str = "builtin:tiny"
    """Task JSONL ({"id", "prompt", "tests": {"kind": ...}, "stop"?}, trainer/data.py) or builtin:tiny."""
    out: Path = Path("runs/label/samples.jsonl")
    """Output JSONL, appended to: run once per checkpoint (workers serving it) to collect several."""
    n: int = 4
    """Samples per task (1..1024)."""
    run: str = "default"
    """Base run name: tasks go to run `<run>-sample` (`psgpo serve rollout --run <run>-sample`)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis of the rollout workers."""
    checkpoint: str = ""
    """Tag written to every row; empty: `v<policy_version>` of the trajectory."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    max_new_tokens: int = 256
    """Longest response, in tokens."""
    seed: int = 0
    """Sampling seed of every task (0: fresh randomness)."""
    timeout_s: float = 600.0
    """Stop with an error when no trajectory arrived for this long."""
    consumer: str = "label-sampler"
    """Consumer name in the trajectories group of `<run>-sample`."""


def sample(args: SampleArgs) -> int:
    """Enqueues every task with n samples, writes one input row per trajectory; returns rows written."""
    import redis

    from trainer.data import DataError, load_tasks

    if not 1 <= args.n <= 1024 or not 1 <= args.max_new_tokens <= 32768 or args.timeout_s <= 0:
        raise UserError("need 1 <= --n <= 1024, 1 <= --max-new-tokens <= 32768 and --timeout-s > 0")
    try:
        run_name = keys.validate_run(f"{args.run}-sample")
        specs = load_tasks(args.tasks)
    except (ValueError, DataError) as exc:
        raise UserError(str(exc)) from None
    try:
        return _sample(args, run_name, specs)
    except redis.RedisError as exc:
        raise UserError(f"Redis at {args.redis_url}: {exc}") from None


def _sample(args: SampleArgs, run_name: str, specs: Sequence[Any]) -> int:
    from services.client.sdk import PsgpoRun

    nonce = uuid.uuid4().hex[:10]
    with PsgpoRun(args.redis_url, run_name) as run:
        by_task_id = {}
        for spec in specs:
            sampling = {
                "temperature": args.temperature,
                "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens,
                "seed": args.seed,
                "stop": list(spec.stop),
            }
            task_id = run.enqueue(
                spec.prompt, spec.tests, args.n, sampling, task_id=f"{spec.id}@{nonce}", score_with_prm=False
            )
            by_task_id[task_id] = spec
        expected, written, refused = args.n * len(specs), 0, 0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            for batch in run.trajectories(
                args.consumer, batch=64, block_ms=1000, idle_timeout_s=args.timeout_s
            ):
                for traj in batch:
                    spec = by_task_id.get(traj.task_id)
                    if spec is None:
                        continue  # an earlier sample job's leftovers: acknowledged with the batch
                    if any(fail.component == "task" for fail in traj.failures):
                        refused += args.n  # a refused task leaves one record for all its samples
                        log.warning("task %s refused: %s", spec.id, traj.failures[0].reason)
                        continue
                    row = {
                        "task_id": spec.id,
                        "prompt": spec.prompt,
                        "response": traj.response,
                        "tests": tests_to_dict(parse_tests(spec.tests)),
                        "checkpoint": args.checkpoint or f"v{traj.policy_version}",
                        "logprob": float(sum(traj.logprobs)),  # the policy's log-likelihood of the response
                    }
                    if traj.HasField("verdict"):  # else the label job asks the sandbox
                        row["passed"] = bool(traj.verdict.passed)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    written += 1
                f.flush()
                batch.ack()
                if written + refused >= expected:
                    break
    if written + refused < expected:
        raise UserError(
            f"only {written + refused} of {expected} samples arrived within {args.timeout_s:g}s of silence: "
            f"are rollout workers serving run '{run_name}'? ({written} rows written to {args.out})"
        )
    print(f"sample: {written} rows appended to {args.out} ({refused} refused)", flush=True)
    return written


@dataclass
class SelectArgs:
    """Arguments of `psgpo label select`: one data strategy's training set from labelled records."""

    input: Path | None = None
    """Labelled JSONL (`psgpo label run` output; required)."""
    out: Path | None = None
    """Output JSONL, same format (required)."""
    strategy: Strategy = "full"
    """full, revised-only (failed responses with a correct prefix), remove-hard (drop prompts where no
    sample passed and no correct prefix was found), medium-only (prompts with a pass rate in the band)."""
    medium_low: float = 0.1
    """Lowest sample pass rate of a medium prompt."""
    medium_high: float = 0.9
    """Highest sample pass rate of a medium prompt."""


def select(args: SelectArgs) -> int:
    if args.input is None or args.out is None:
        raise UserError("--input and --out are required")
    if not 0 <= args.medium_low <= args.medium_high <= 1:
        raise UserError("need 0 <= --medium-low <= --medium-high <= 1")
    records = read_jsonl(args.input)
    for number, record in enumerate(records, 1):
        missing = [k for k in ("task_id", "passed", "labels") if k not in record]
        if missing:
            raise UserError(f"{args.input}:{number}: not a labelled record (missing {', '.join(missing)})")
    chosen = select_records(records, args.strategy, args.medium_low, args.medium_high)
    _write_jsonl(args.out, chosen)
    tasks = len({r["task_id"] for r in chosen})
    print(f"select {args.strategy}: {len(chosen)} of {len(records)} records ({tasks} prompts) -> {args.out}")
    return len(chosen)
