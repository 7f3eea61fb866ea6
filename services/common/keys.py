"""Every Redis name psgpo uses, in one place (docs/redis.md describes each one).

A run's keys share the prefix `psgpo:{run}:`; `run` is a short name of letters, digits, `_`, `.`, `-`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "psgpo"
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

TASKS_GROUP = "rollout"
TRAJECTORIES_GROUP = "trainer"

PAYLOAD_FIELD = "pb"  # every stream entry carries one protobuf message in this field
SCHEMA_VERSION = 1  # Task.schema_version / Trajectory.schema_version the code reads and writes

# Fields of the policy hash; version/uri/sha256 are the contract, the rest are extras.
POLICY_FIELDS = ("version", "uri", "sha256", "size", "format")


def validate_run(run: str) -> str:
    """The run name unchanged, or ValueError when it is empty, too long or has other characters."""
    if not isinstance(run, str) or RUN_NAME.fullmatch(run) is None:
        raise ValueError(f"run name must be 1-64 characters of [A-Za-z0-9_.-], got {run!r}")
    return run


@dataclass(frozen=True, slots=True)
class RunKeys:
    """The names of one run. Build with `run_keys(run)`."""

    run: str

    @property
    def tasks(self) -> str:
        """Stream of `Task` (group `rollout`)."""
        return f"{PREFIX}:{self.run}:tasks"

    @property
    def trajectories(self) -> str:
        """Stream of scored `Trajectory` (group `trainer`)."""
        return f"{PREFIX}:{self.run}:trajectories"

    @property
    def dead(self) -> str:
        """Dead-letter stream: poison entries of either stream, with the reason."""
        return f"{PREFIX}:{self.run}:dead"

    @property
    def policy(self) -> str:
        """Hash {version, uri, sha256, size, format} of the current policy weights."""
        return f"{PREFIX}:{self.run}:policy"

    @property
    def policy_events(self) -> str:
        """Pub/Sub channel: PolicyVersion protobuf bytes, one message per published version."""
        return f"{PREFIX}:{self.run}:policy:events"

    @property
    def trajectories_written(self) -> str:
        """Set of trajectory ids already added to the trajectories stream (producer-side dedup)."""
        return f"{PREFIX}:{self.run}:trajectories:written"

    @property
    def trajectories_acked(self) -> str:
        """Set of trajectory ids the trainer group acknowledged (consumer-side dedup)."""
        return f"{PREFIX}:{self.run}:trajectories:acked"

    def all(self) -> tuple[str, ...]:
        """Every key of the run (for cleanup; the channel is not a key)."""
        return (
            self.tasks,
            self.trajectories,
            self.dead,
            self.policy,
            self.trajectories_written,
            self.trajectories_acked,
        )


def run_keys(run: str) -> RunKeys:
    return RunKeys(validate_run(run))
