"""Gather the worker's heap into 2 MB pages once, before it serves: cheaper forks and exits.

Every run is a fork of the worker. Linux copies a page table entry per 4 KB page of the worker's
private memory at the fork and drops them all at the run's exit (~12 MB here, ~3000 entries, each
with a reference count to take and drop). `MADV_COLLAPSE` (Linux 6.1) moves an already populated,
2 MB-aligned range into one huge page now, whatever the system's THP policy (except `never`). The
range is then one entry at the fork, and a run that writes into it copies only the 4 KB it writes
(the kernel splits the mapping, in that run only); the huge page stays one block of memory, which
the kernel copies and frees in batches. Only whole 2 MB-aligned ranges inside one anonymous
read-write mapping qualify (the malloc heap, pymalloc's arenas): on this VM 0, 2 or 4 MB of the
worker's ~12 MB, depending on where ASLR put its mappings. Measured, 2 workers, the 164 HumanEval
solutions, interleaved rounds: 1-3% less CPU per run.

The ranges are not marked `MADV_HUGEPAGE`, so khugepaged leaves them alone and the kernel never
allocates a 2 MB page for a run's fault there. Where the kernel refuses (no THP support, a kernel
before 6.1, no free 2 MB block), nothing changes and `collapse()` returns 0.
"""

from __future__ import annotations

import ctypes

MADV_COLLAPSE = 25
HUGE = 2 * 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def candidate_ranges(maps: str) -> list[tuple[int, int]]:
    """The 2 MB-aligned ranges wholly inside anonymous read-write private mappings (unnamed, or the
    malloc heap), from /proc/self/maps text: (start, end) with end - start a multiple of 2 MB."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[1] != "rw-p" or (len(fields) > 5 and fields[5] != "[heap]"):
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        start, end = -(-low // HUGE) * HUGE, high // HUGE * HUGE
        if end > start:
            ranges.append((start, end))
    return ranges


def collapse() -> int:
    """Collapse what can be; the number of 2 MB pages made (0 where the kernel refuses)."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    made = 0
    for start, end in candidate_ranges(maps):
        for address in range(start, end, HUGE):  # one range at a time: a refused one stops nothing
            made += _libc.madvise(address, HUGE, MADV_COLLAPSE) == 0
    return made


def huge_kib() -> int:
    """This process's memory in huge pages (AnonHugePages), KiB; 0 where the kernel does not say."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
