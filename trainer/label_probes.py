"""The probe cache and the probes of `psgpo label` (trainer/label_job.py runs the job).

`ProbeCache` is the append-only JSONL beside the output that a restarted job reads so that it never
redoes a probe; `settle_verdicts` asks the sandbox about responses without "passed" and references;
`Prober` drives every failed response's `LastCorrectSearch` at once, each distinct prefix one rollout
task on run `<run>-label`. Also here, because both this module and the job need them at run time:
`label_run`, `LabelStopped` and `_sha`. docs/labelling.md has the formats and the commands.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psgpo.v1.rollout_pb2 import SamplingParams, Task, Trajectory
from services.client.testspec import to_proto
from services.common import keys
from services.common.errors import UserError
from services.common.lines import Line
from services.sandbox.model import TestSpec
from trainer.label import LastCorrectSearch, _open_appendable, prefix_text

if TYPE_CHECKING:
    from trainer.label_job import LabelArgs, Row

log = logging.getLogger(__name__)

# ---- shared with the job ----------------------------------------------------------------------------


def label_run(run: str) -> str:
    return keys.validate_run(f"{run}-label")


class LabelStopped(UserError):
    """The job cannot go on (an outage outlasted the retries); everything finished is saved."""


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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
