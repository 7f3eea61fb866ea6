"""The pure core of trainer/label.py: the binary search against brute force, its probe budget, its
memoisation, what it returns on non-monotone outcomes, the label layout around neutral lines, and the
data strategies."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.lines import scored_lines, split_lines
from trainer.label import (
    LastCorrectSearch,
    binary_search_last_correct,
    brute_force_labels,
    labels_for,
    probe_bound,
    prompt_stats,
    select_records,
    strategy_tags,
)

NEUTRAL_LINES = ["", "   ", "# a comment", "    # indented comment"]


@st.composite
def responses(draw: st.DrawFn) -> tuple[str, int]:
    """A response with T >= 1 non-neutral lines between random neutral ones, and T."""
    num_scored = draw(st.integers(1, 70))
    neutral_mask = draw(st.lists(st.booleans(), min_size=num_scored, max_size=3 * num_scored))
    lines, scored = [], 0
    for neutral in neutral_mask:
        if neutral:
            lines.append(draw(st.sampled_from(NEUTRAL_LINES)))
        elif scored < num_scored:
            scored += 1
            lines.append(f"    x{scored} = {scored}")
    lines += [f"    y{i} = {i}" for i in range(num_scored - scored)]
    trailing_newline = draw(st.booleans())
    return "\n".join(lines) + ("\n" if trailing_newline else ""), num_scored


class Counting:
    """A probe from a list of outcomes (outcomes[m - 1] for prefix m) that counts its calls."""

    def __init__(self, outcomes: list[bool]) -> None:
        self.outcomes = outcomes
        self.calls: list[int] = []

    def __call__(self, m: int) -> bool:
        assert 1 <= m <= len(self.outcomes), m
        self.calls.append(m)
        return self.outcomes[m - 1]


@settings(max_examples=300, deadline=None)
@given(responses(), st.data(), st.integers(1, 16))
def test_binary_search_matches_brute_force_on_monotone_outcomes(case, data, k) -> None:
    response, num_scored = case
    assert len(scored_lines(split_lines(response))) == num_scored
    m_true = data.draw(st.integers(0, num_scored), label="m*")
    probe = Counting([m <= m_true for m in range(1, num_scored + 1)])

    m_star, probe_log = binary_search_last_correct(num_scored, probe)

    assert m_star == m_true
    assert labels_for(response, m_star)["labels"] == brute_force_labels(response, probe)
    searched = probe.calls[: len(probe_log)]  # brute force called the probe after the search
    assert len(set(searched)) == len(searched) == len(probe_log)  # never the same prefix twice
    assert [m for m, _ in probe_log] == searched
    assert len(probe_log) <= math.ceil(math.log2(num_scored + 1)) <= probe_bound(num_scored)
    assert k * len(probe_log) <= k * (math.ceil(math.log2(num_scored)) + 1)  # the brief's budget


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=80))
def test_non_monotone_outcomes_give_a_probed_boundary(outcomes: list[bool]) -> None:
    """What the docs promise when monotonicity fails: prefix m* is correct (or m* = 0) and prefix
    m* + 1 is incorrect (or m* = T), both as probed; the labels are those of that m*."""
    num_scored = len(outcomes)
    probe = Counting(outcomes)
    m_star, probe_log = binary_search_last_correct(num_scored, probe)
    probed = dict(probe_log)
    assert 0 <= m_star <= num_scored
    assert m_star == 0 or probed[m_star] is True
    assert m_star == num_scored or probed[m_star + 1] is False
    assert len(probe_log) <= probe_bound(num_scored)


def test_a_non_monotone_case_by_hand() -> None:
    # T = 7, outcomes + - + + - - +: the bisection probes 4 (+), 6 (-), 5 (-): m* = 4, although prefix 2
    # is incorrect and prefix 7 correct. Lines 1..4 get +1 (prefix 2 was never probed), 5..7 get -1.
    outcomes = [True, False, True, True, False, False, True]
    m_star, probe_log = binary_search_last_correct(7, Counting(outcomes))
    assert (m_star, probe_log) == (4, [(4, True), (6, False), (5, False)])
    response = "\n".join(f"x{i} = {i}" for i in range(7))
    assert labels_for(response, m_star)["labels"] == [1, 1, 1, 1, -1, -1, -1]
    assert brute_force_labels(response, Counting(outcomes)) == [1, -1, 1, 1, -1, -1, 1]


def test_memo_answers_known_prefixes_without_probing() -> None:
    outcomes = [m <= 9 for m in range(1, 21)]
    memo: dict[int, bool] = {}
    first = Counting(outcomes)
    m_star, probe_log = binary_search_last_correct(20, first, memo)
    assert m_star == 9 and len(first.calls) == len(probe_log) == 5
    assert memo == dict(probe_log)
    again = Counting(outcomes)
    assert binary_search_last_correct(20, again, memo) == (9, probe_log)
    assert again.calls == []  # everything came from the memo
    # a memo filled elsewhere (an earlier run's cache) is trusted as is
    partial = Counting(outcomes)
    assert binary_search_last_correct(20, partial, {10: False, 5: True})[0] == 9
    assert 10 not in partial.calls and 5 not in partial.calls


def test_every_line_wrong_and_every_line_right() -> None:
    response = "    a = 1\n\n    b = 2\n    # note\n    return a + b\n"
    lines = split_lines(response)
    assert [line.neutral for line in lines] == [False, True, False, True, False, True]
    m_star, probe_log = binary_search_last_correct(3, lambda m: False)  # even line 1 is unrecoverable
    assert m_star == 0 and [m for m, _ in probe_log] == [2, 1]
    wrong = labels_for(response, 0)
    assert wrong["labels"] == [-1, None, -1, None, -1, None] and wrong["first_bad_line"] == 0
    m_star, _ = binary_search_last_correct(3, lambda m: True)
    right = labels_for(response, m_star)
    assert right["labels"] == [1, None, 1, None, 1, None] and right["first_bad_line"] is None
    assert right["line_spans"] == [[ln.start, ln.end] for ln in lines] == [
        [0, 9], [10, 10], [11, 20], [21, 31], [32, 48], [49, 49]
    ]  # fmt: skip


def test_labels_layout_with_neutral_lines() -> None:
    response = "# plan\n    a = 1\n    b = a\n\n    # check\n    return b * 2"
    got = labels_for(response, 1)
    assert got["labels"] == [None, 1, -1, None, None, -1]
    assert got["first_bad_line"] == 2
    assert [response[s:e] for s, e in got["line_spans"]] == response.split("\n")
    with pytest.raises(ValueError, match="m\\* must be in 0..3"):
        labels_for(response, 4)


def test_search_state_machine_refuses_out_of_order_outcomes() -> None:
    search = LastCorrectSearch(5)
    assert search.next_probe() == 3
    with pytest.raises(ValueError, match="expected the outcome of prefix 3"):
        search.record(2, True)
    with pytest.raises(ValueError, match="not finished"):
        _ = search.m_star
    search.record(3, True)  # lo 3, hi 6
    search.record(4, True)
    search.record(5, False)
    assert search.done and search.next_probe() is None and search.m_star == 4
    with pytest.raises(ValueError, match="at least one non-neutral line"):
        LastCorrectSearch(0)


def _record(task_id: str, passed: bool, labels: list[int | None]) -> dict:
    return {"task_id": task_id, "passed": passed, "labels": labels}


def test_data_strategies() -> None:
    records = [
        _record("mixed", True, [1, 1]),
        _record("mixed", False, [1, -1]),  # revised
        _record("mixed", False, [-1, -1]),
        _record("hard", False, [-1, None, -1]),
        _record("hard", False, [-1]),
        _record("saved", False, [1, None, -1]),  # revised: no sample passed, but not hard
        _record("easy", True, [1]),
    ]
    stats = prompt_stats(records)
    assert stats["mixed"].pass_rate == pytest.approx(1 / 3) and stats["hard"].hard and not stats["saved"].hard

    def chosen(strategy: str, **band: float) -> list[tuple[str, bool]]:
        return [(r["task_id"], r["passed"]) for r in select_records(records, strategy, **band)]

    assert len(chosen("full")) == 7
    assert chosen("revised-only") == [("mixed", False), ("saved", False)]
    assert [t for t, _ in chosen("remove-hard")] == ["mixed"] * 3 + ["saved", "easy"]
    assert {t for t, _ in chosen("medium-only")} == {"mixed"}
    assert {t for t, _ in chosen("medium-only", medium_low=0.0, medium_high=1.0)} == set(stats)
    with pytest.raises(ValueError, match="unknown strategy"):
        select_records(records, "best")
    assert strategy_tags(records[1], stats["mixed"], 0.1, 0.9) == ["revised", "medium"]
    assert strategy_tags(records[3], stats["hard"], 0.1, 0.9) == ["unrecoverable", "hard"]
    assert strategy_tags(records[6], stats["easy"], 0.1, 0.9) == ["passed"]
