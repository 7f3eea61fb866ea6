"""The run directory: made once per worker, emptied after every run, and tempfile's default in runs.

Nothing here imports `shutil` or `tempfile`: in the worker they would load shutil's compression
modules (bz2, lzma: four libraries, 20 mappings) that every run's fork then copies for nothing (the
worker went from 205 to 183 mappings; CPU per run within the noise of two interleaved measurements,
0.988 and 1.003 of before). A run that imports tempfile gets the real module, with the run directory
as its default (`TempdirDefault`).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import stat
from types import ModuleType
from typing import Any


def prepare_run_dir(path: str, uid: int | None) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    if uid is not None:
        os.chown(path, uid, uid)
    os.chmod(path, 0o700)


def empty_run_dir(path: str, uid: int | None) -> None:
    """Remove everything a run left (as the worker: the run's uid cannot stop it) and restore the
    directory's owner and mode, which the run could have changed."""
    os.chmod(path, stat.S_IRWXU)
    _empty(path)
    status = os.lstat(path)
    if status.st_mode & 0o7777 != 0o700 or (uid is not None and status.st_uid != uid):
        prepare_run_dir(path, uid)


def _empty(path: str) -> None:
    """Remove what `path` holds, never following a symbolic link. Iterative and by relative names,
    walking down and up with chdir: a run can nest directories far deeper than the recursion limit or
    PATH_MAX allow, or than there are file descriptors for. A directory the run made unreadable or
    unwritable is opened up first; one that cannot be emptied is left after one try (no loop)."""
    try:
        back: int | None = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        back = None
    os.chdir(path)
    depth = 0
    stuck: set[int] = set()  # inodes of directories tried once and not emptied
    try:
        while True:
            with os.scandir(".") as entries:
                found = [(e.name, e.is_dir(follow_symlinks=False), e.inode()) for e in entries]
            down = False
            for name, is_dir, inode in found:
                if not is_dir:
                    with contextlib.suppress(OSError):
                        os.unlink(name)
                    continue
                with contextlib.suppress(OSError):
                    os.rmdir(name)  # empty already
                    continue
                if inode in stuck:
                    continue
                try:
                    os.chmod(name, stat.S_IRWXU)
                    os.chdir(name)
                except OSError:
                    stuck.add(inode)
                    continue
                depth += 1
                down = True
                break
            if down:
                continue
            if depth == 0:
                return
            with os.scandir(".") as rest:
                if any(True for _ in rest):
                    stuck.add(os.stat(".").st_ino)  # the parent's next look skips it
            os.chdir("..")
            depth -= 1
    finally:
        if back is None:
            os.chdir("/")
        else:
            os.fchdir(back)
            os.close(back)


class TempdirDefault:
    """A meta path finder for the runs: `import tempfile` loads the real module and then makes the run
    directory its default (`tempfile.tempdir`), as setting it in the worker would have."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "tempfile":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _SetTempdir(spec.loader, self.run_dir)
        return spec


class _SetTempdir:
    def __init__(self, loader: Any, run_dir: str) -> None:
        self.loader = loader
        self.run_dir = run_dir

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.tempdir = self.run_dir  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:  # get_source (tracebacks, linecache), get_filename ...
        return getattr(self.loader, name)
