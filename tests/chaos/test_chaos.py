"""Fault injection on a real local stack (services/chaos.py): Redis with AOF, the sandbox and PRM services
and rollout workers as subprocesses, the tiny models. The fast subset (a SIGKILLed rollout worker, a
Redis crash + restart) runs with `make test`; the whole suite (`-m chaos`, `make chaos`) takes minutes.
The accounting helpers are checked on made-up inputs first, so a passing scenario means something."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.chaos import QUICK, SCENARIOS, run_chaos, run_scenario
from services.chaos_accounting import Outcome, check_versions, recovery, tally
from services.chaos_stack import Stack

RECOVERY_BOUND_S = 30.0  # fault -> next accepted trajectory, on 2 busy cores
STALL_BOUND_S = 45.0  # includes restarting a worker process (torch import, model load)


def test_tally_counts_lost_duplicated_and_unexpected() -> None:
    out = Outcome("x", "x", "protocol")
    expected = {"a:0", "a:1", "b:0", "b:1"}
    tally(out, expected, ["a:0", "a:1", "a:1", "b:0", "zz:0"], acked={"a:0", "a:1", "b:0", "b:1"})
    assert (out.trained, out.lost, out.duplicated, out.unexpected) == (3, 1, 1, 1)
    tally(out, expected, ["a:0", "a:1", "b:0", "b:1"], acked={"a:0", "a:1", "b:0", "b:1"})
    assert (out.trained, out.lost, out.duplicated, out.unexpected) == (4, 0, 0, 0)


def test_recovery_is_the_next_acceptance_and_the_longest_stall_after_the_fault() -> None:
    assert recovery([1.0, 2.0, 10.5, 11.0, 20.0], fault_at=10.0) == (0.5, 9.0)
    assert recovery([1.0, 2.0], fault_at=10.0) == (None, None)


def test_check_versions_catches_gaps_repeats_regressions_and_laggards() -> None:
    incarnations = {"w0.1": [1, 2], "w0.2": [1, 3]}  # killed after v2; its restart went straight to v3
    ok, summary = check_versions([1, 2, 3], {"w0": [1, 3]}, incarnations, [(0, 0), (2, 3)])
    assert ok, summary
    assert not check_versions([1, 3], {}, {}, [])[0]  # a version skipped by the publisher
    assert not check_versions([1, 2, 2], {}, {}, [])[0]  # published twice
    assert not check_versions([1, 2], {}, {"w.1": [2, 2]}, [])[0]  # applied twice
    assert not check_versions([1, 2], {}, {"w.1": [2, 1]}, [])[0]  # went back
    assert not check_versions([1, 2], {"w": [1]}, {"w.1": [1]}, [])[0]  # left behind
    assert not check_versions([1, 2], {}, {}, [(2, 1)])[0]  # a version newer than published then


@pytest.fixture(scope="module")
def stack(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tiny_models, tmp_path_factory.mktemp("chaos")) as running:
        running.start()
        yield running


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK)
def test_fast_fault(name: str, stack: Stack, tmp_path: Path) -> None:
    scenario = dataclasses.replace(SCENARIOS[name], tasks=6)
    outcome = run_scenario(stack, scenario, tmp_path, timeout_s=80)
    assert outcome.error is None, f"{outcome.error}\nnotes: {outcome.notes}"
    assert outcome.lost == 0 and outcome.duplicated == 0 and outcome.unexpected == 0, outcome
    assert outcome.trained == outcome.expected == 12
    assert outcome.recovery_s is not None and outcome.recovery_s < RECOVERY_BOUND_S, outcome
    assert outcome.max_gap_s is not None and outcome.max_gap_s < STALL_BOUND_S, outcome
    assert outcome.ok, outcome  # also: versions, no dead letters, nothing pending, no crash


@pytest.mark.chaos
@pytest.mark.timeout(1800)
def test_full_suite(tiny_models: Path, tmp_path: Path) -> None:
    outcomes = run_chaos(tmp_path, None, tiny_models)
    assert [o.scenario for o in outcomes] == list(SCENARIOS)
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
