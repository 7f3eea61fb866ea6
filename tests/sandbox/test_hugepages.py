"""The worker gathers its heap into 2 MB pages before serving (hugepages.py): which ranges qualify, that
the kernel really collapses them where it can, and that runs behave as before (copy-on-write still
copies: what a run writes never reaches the worker or the next run)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from services.sandbox import hugepages
from services.sandbox.client import AssertTests, HumanEvalTests, SandboxClient
from tests.sandbox.conftest import start_sandbox

MB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def kernel_collapses() -> str:
    """Why this kernel cannot collapse pages, or '' when it can (MADV_COLLAPSE: Linux 6.1, THP not never)."""
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    if (major, minor) < (6, 1):
        return f"Linux {platform.release()} has no MADV_COLLAPSE (6.1+)"
    if not THP.exists() or "[never]" in THP.read_text():
        return "transparent huge pages are off on this machine"
    return ""


def test_candidate_ranges_are_whole_aligned_2mb_ranges_of_anonymous_rw_mappings():
    maps = "\n".join(
        [
            "55c9db9a8000-55c9dbd05000 rw-p 00000000 00:00 0          [heap]",  # 3.4 MB, one aligned range
            "7fc24545f000-7fc245a00000 rw-p 00000000 00:00 0",  # unnamed: 0x7fc245600000-0x7fc245a00000
            "7fc245e44000-7fc246f78000 rw-p 00443000 fe:00 26933      /usr/lib/libpython3.11.so",  # a file
            "7fc200000000-7fc200400000 r--p 00000000 00:00 0",  # read-only
            "7fc300000000-7fc300400000 rw-s 00000000 00:01 7          /dev/zero (deleted)",  # shared
            "7ffdf8ec9000-7ffdf8eea000 rw-p 00000000 00:00 0          [stack]",
            "7fc400100000-7fc400200000 rw-p 00000000 00:00 0",  # 1 MB: no whole 2 MB range
        ]
    )
    assert hugepages.candidate_ranges(maps) == [
        (0x55C9DBA00000, 0x55C9DBC00000),
        (0x7FC245600000, 0x7FC245A00000),
    ]
    for start, end in hugepages.candidate_ranges(maps):
        assert start % hugepages.HUGE == 0 and end % hugepages.HUGE == 0 and end > start


def test_collapse_makes_huge_pages_where_the_kernel_can():
    why = kernel_collapses()
    if why:
        pytest.skip(why)
    script = (
        "from services.sandbox import hugepages\n"
        "heap = [bytearray(1000) for _ in range(20000)]\n"  # ~20 MB of populated anonymous memory
        "before = hugepages.huge_kib()\n"
        "made = hugepages.collapse()\n"
        "print(before, made, hugepages.huge_kib(), sum(len(b) for b in heap))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    before, made, after, size = (int(x) for x in out.stdout.split())
    assert size == 20000 * 1000
    assert made >= 1, out.stdout
    assert after >= before + 2048  # KiB: at least one 2 MB page more


def test_the_service_reports_each_workers_huge_pages_and_runs_are_unchanged():
    running = start_sandbox(workers=2, huge_pages=True)
    try:
        with SandboxClient(f"http://127.0.0.1:{running.http_port}") as client:
            info = client.info()
            # how many whole 2 MB ranges a worker's heap holds depends on where ASLR put its mappings: 0-3
            assert len(info["huge_pages_kib"]) == 2
            assert all(kib % 2048 == 0 and 0 <= kib <= 64 * 1024 for kib in info["huge_pages_kib"])
            # a run that rewrites preloaded state and lots of the worker's heap: the next runs see none of it
            spoil = (
                "import math, collections, re\n"
                "math.pi = 3\n"
                "collections.Counter = None\n"
                "re.compile = None\n"
                "junk = [bytearray(4096) for _ in range(4000)]\n"
                "def spoiled():\n    return math.pi\n"
            )
            assert client.run(spoil, AssertTests("assert spoiled() == 3\n")).passed  # the program's view
            for _ in range(4):
                clean = client.run(
                    "import math, collections, re\n"
                    "def f():\n    return math.pi, collections.Counter('aab')['a'], bool(re.compile('a'))\n",
                    HumanEvalTests("def check(c):\n    assert c() == (3.141592653589793, 2, True)\n", "f"),
                )
                assert clean.passed, clean
    finally:
        running.stop()


def test_without_huge_pages_the_service_still_serves():
    running = start_sandbox(workers=1, huge_pages=False)
    try:
        with SandboxClient(f"http://127.0.0.1:{running.http_port}") as client:
            # what the kernel did by itself (THP "always") is reported as it is
            assert len(client.info()["huge_pages_kib"]) == 1
            assert client.run("x = 1\n", AssertTests("assert x == 1\n")).passed
    finally:
        running.stop()
