"""`psgpo demo`: the main job (services/demo/pipeline.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from services.demo.config import DemoConfig, preset

# What a demo writes into OUT (what --fresh removes; nothing else in OUT is touched).
OUTPUTS = (
    "demo_state.json",
    "tasks",
    "models",
    "sft",
    "up",
    "ppo",
    "prm_data",
    "prm",
    "prm_eval",
    "logs",
    "weights",
    "plots",
    "results.json",
    "results.md",
)


def run_demo(out: Path, cfg: DemoConfig | None = None, fresh: bool = False) -> dict[str, Any]:
    from services.demo.pipeline import run_demo as run

    if fresh:
        for name in OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    return run(out, cfg or preset(quick=False))


__all__ = ["DemoConfig", "preset", "run_demo"]
