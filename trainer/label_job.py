"""The `psgpo label run` job: its arguments (`LabelArgs`), input rows, the labelled records and
their writer, `label` itself and its cost report.

The search is trainer/label.py's pure core; the probe cache and the probes through the rollout task
stream are trainer/label_probes.py. docs/labelling.md has the formats, the cost figures and the
commands.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.client.testspec import parse_tests
from services.common import keys
from services.common.errors import UserError
from services.common.lines import scored_lines, split_lines
from services.sandbox.model import TestSpec, tests_to_dict
from trainer.label import (
    STRATEGIES,
    LastCorrectSearch,
    _open_appendable,
    is_revised,
    labels_for,
    numbered_jsonl,
    probe_bound,
    prompt_stats,
    read_jsonl,
    select_records,
    strategy_tags,
)
from trainer.label_probes import (
    LabelStopped,
    ProbeCache,
    Prober,
    RunCounters,
    _Search,
    _sha,
    label_run,
    settle_verdicts,
)

log = logging.getLogger(__name__)

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
