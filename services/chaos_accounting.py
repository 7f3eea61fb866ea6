"""The chaos suite's accounting (services/chaos.py runs the scenarios): one `Outcome` per scenario, the
pure checks that fill it, and the Markdown table. No processes, no Redis: tested on made-up inputs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Outcome:
    scenario: str
    fault: str
    consumer: str  # "trainer" or "protocol"
    expected: int = 0
    trained: int = 0  # distinct expected ids trained on
    lost: int = 0
    duplicated: int = 0  # extra copies trained on
    unexpected: int = 0  # ids nobody asked for
    recovery_s: float | None = None
    max_gap_s: float | None = None  # longest pause between two accepted trajectories after the fault
    scoring_failures: int = 0  # trained on with a recorded sandbox / PRM failure
    dead_letters: int = 0
    pending_left: int = 0  # tasks + trajectories still unacknowledged at the end
    crashes: int = 0  # workers or trainers that exited by themselves (restarted as a supervisor would)
    versions_ok: bool = False
    versions: str = ""
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.expected > 0
            and self.trained == self.expected
            and self.lost == 0
            and self.duplicated == 0
            and self.unexpected == 0
            and self.scoring_failures == 0
            and self.dead_letters == 0
            and self.pending_left == 0
            and self.crashes == 0
            and self.versions_ok
            and self.recovery_s is not None
        )


def table(outcomes: list[Outcome]) -> str:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    rows = [
        "| fault | recovery s | expected | trained | lost | duplicated | policy versions ok "
        "| longest stall s | ok |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for o in outcomes:
        versions = ("yes" if o.versions_ok else "NO") + f" ({o.versions})"
        rows.append(
            f"| {o.fault} | {num(o.recovery_s)} | {o.expected} | {o.trained} | {o.lost} | {o.duplicated} "
            f"| {versions} | {num(o.max_gap_s)} | {'yes' if o.ok else 'NO'} |"
        )
    return "\n".join(rows)


def tally(out: Outcome, expected: set[str], ids: list[str], acked: set[str]) -> None:
    """trained / lost / duplicated / unexpected from the ids trained on (repeats kept) and the ids the
    consumer acknowledged: an acknowledged id that was not trained on is lost too."""
    counts = Counter(ids)
    trained = set(counts)
    out.trained = len(trained & expected)
    out.duplicated = sum(n - 1 for n in counts.values())
    out.unexpected = len(trained - expected)
    out.lost = len((expected - trained) | (acked - trained))


def recovery(times: list[float], fault_at: float) -> tuple[float | None, float | None]:
    """(fault -> next accepted trajectory, longest pause between acceptances after the fault)."""
    after = sorted(t for t in times if t > fault_at)
    if not after:
        return None, None
    gaps = [b - a for a, b in zip([fault_at, *after], after, strict=False)]
    return after[0] - fault_at, max(gaps)


def check_versions(
    published: list[int],
    live: dict[str, list[int]],
    incarnations: dict[str, list[int]],
    versions: list[tuple[int, int]],
) -> tuple[bool, str]:
    """(ok, summary). `published`: versions in publish order; `live` / `incarnations`: the versions each
    live worker / each worker incarnation (killed ones too) applied, in order; `versions`: (a trajectory's
    version, the newest published when it was taken). Published must be 1..K, each once; each incarnation
    applies strictly increasing published versions; live workers end on K; a trajectory's version is 0
    or published, never newer than the newest published then."""
    problems = []
    if published != list(range(1, len(published) + 1)):
        problems.append(f"published {published}")
    for name, applied in incarnations.items():
        if any(b <= a for a, b in zip(applied, applied[1:], strict=False)):
            problems.append(f"{name} applied {applied}")
        unpublished = sorted(set(applied) - set(published))
        if unpublished:
            problems.append(f"{name} applied unpublished {unpublished}")
    newest = published[-1] if published else 0
    for name, applied in live.items():
        if (applied[-1] if applied else 0) != newest:
            problems.append(f"{name} ended on v{applied[-1] if applied else 0}, newest v{newest}")
    bad = [v for v, then in versions if v > then or (v and v not in published)]
    if bad:
        problems.append(f"trajectories with versions {sorted(set(bad))}")
    return (not problems), ("; ".join(problems) if problems else f"v1..v{newest}")
