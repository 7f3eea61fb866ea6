"""Run uids: each worker slot runs its programs as a uid of its own, from a block no process uses.
Finding and killing every process of such a uid is the backstop when a worker itself had to die."""

from __future__ import annotations

import contextlib
import os
import random
import signal

from services.sandbox.config import SandboxSettings


def pick_uid_base(settings: SandboxSettings) -> int:
    """The configured base, or a random block of uids that no process uses: two services on one host
    must never share run uids (they would share process limits and could signal each other)."""
    if settings.run_uid_base is not None:
        return settings.run_uid_base
    rng = random.SystemRandom()
    for _ in range(20):
        base = rng.randrange(1 << 8, 1 << 18) * 4096  # within [2**20, 2**30)
        if not any(processes_of_uid(uid) for uid in range(base, base + settings.workers)):
            return base
    raise RuntimeError("no free block of uids found for the sandbox runs")


def _uid_and_state(pid: str) -> tuple[int, str] | None:
    """Real uid and state from /proc/PID/status (the directory owner is root for non-dumpable tasks)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    uid = state = None
    for line in text.splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("State:"):
            state = line.split()[1]
    return (uid, state) if uid is not None and state is not None else None


def processes_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid` (a run slot's own uid)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _uid_and_state(entry)
            if info is not None and info[0] == uid and info[1] != "Z":
                found.append(int(entry))
    return found


def kill_uid(uid: int) -> int:
    """SIGKILL every process of a run slot's uid (the backstop when a worker itself had to die)."""
    killed = 0
    for pid in processes_of_uid(uid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed
