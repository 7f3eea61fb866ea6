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

1. the pure core (this module): `LastCorrectSearch`, `binary_search_last_correct`, `brute_force_labels`,
   `labels_for`;
2. records and data strategies (this module): `strategy_tags`, `select_records`;
3. the job, trainer/label_job.py (`LabelArgs`, `label`): probes travel as ordinary rollout tasks on run
   `<run>-label`, so any number of rollout workers share them; every probe result is cached before it
   is acknowledged, so a killed job resumes where it stopped and never probes a prefix twice. The probe
   cache and the probes themselves are trainer/label_probes.py (`ProbeCache`, `Prober`);
4. trainer/label_sample.py: `sample` (make the input by sampling a policy through the rollout workers)
   and `select` (write a training set with one data strategy).

This module imports no Redis, sandbox or SDK code. docs/labelling.md has the formats, the cost figures
and the commands.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from services.common.errors import UserError
from services.common.lines import Line, scored_lines, split_lines

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
    """(line number, row) of a JSONL file (trainer/data.py's reader; blank lines and an empty file are
    fine); UserError naming the file and line of anything that is not a JSON object."""
    from trainer.data import DataError, read_jsonl_rows

    try:
        return read_jsonl_rows(path, allow_empty=True)
    except DataError as exc:
        raise UserError(str(exc)) from None


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
