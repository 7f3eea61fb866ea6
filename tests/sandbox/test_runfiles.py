"""The run directory's helpers (runfiles.py): emptying it whatever a run left, and tempfile's default
in runs without the worker importing tempfile (and with it shutil, bz2, lzma)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from services.sandbox.client import AssertTests
from services.sandbox.runfiles import empty_run_dir, prepare_run_dir
from tests.sandbox.conftest import Sandbox

ROOT = Path(__file__).resolve().parents[2]


def test_empty_run_dir_removes_deep_locked_trees_and_never_follows_links(tmp_path: Path):
    run = tmp_path / "run"
    prepare_run_dir(str(run), None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (run / "link").symlink_to(outside)
    (run / "file").write_text("x")
    os.mkfifo(run / "fifo")
    here = os.getcwd()
    os.chdir(run)
    try:
        for _ in range(3000):  # deeper than the recursion limit, and past PATH_MAX in total
            os.mkdir("n" * 30)
            os.chdir("n" * 30)
        Path("leaf").write_text("y")
        os.chmod("leaf", 0o400)
    finally:
        os.chdir(here)
    locked = run / "locked"
    locked.mkdir()
    (locked / "inner").write_text("z")
    os.chmod(locked, 0)
    os.chmod(run, 0o500)

    empty_run_dir(str(run), None)

    assert os.listdir(run) == []
    assert stat.S_IMODE(os.lstat(run).st_mode) == 0o700
    assert (outside / "keep.txt").read_text() == "keep"
    assert os.getcwd() == here  # the caller's working directory is given back


def test_tempdir_default_gives_the_real_tempfile_with_the_run_dir(tmp_path: Path):
    script = (
        "import sys\n"
        "from services.sandbox.runfiles import TempdirDefault\n"
        f"sys.meta_path.insert(0, TempdirDefault({str(tmp_path)!r}))\n"
        "import inspect, tempfile\n"
        "with tempfile.NamedTemporaryFile(delete=False) as f:\n"
        "    pass\n"
        "source = inspect.getsource(tempfile)\n"  # the loader still answers for tracebacks and inspect
        "print(tempfile.gettempdir(), f.name.rsplit('/', 1)[0], 'def mkdtemp' in source)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path), str(tmp_path), "True"]


def test_runs_get_tempfile_in_their_dir_and_inherit_no_compression_modules(sandbox: Sandbox):
    code = (
        "import sys\n"
        "preloaded = sorted(m for m in ('shutil', 'tempfile', 'bz2', 'lzma') if m in sys.modules)\n"
        "import os, tempfile\n"
        "def where():\n"
        "    with tempfile.TemporaryDirectory() as d:\n"
        "        here = os.getcwd()\n"
        "        return [tempfile.gettempdir() == here, os.path.dirname(d) == here, preloaded]\n"
    )
    result = sandbox.run(code, AssertTests("assert where() == [True, True, []]\n"))
    assert result.passed, result
    sandbox.assert_clean()
