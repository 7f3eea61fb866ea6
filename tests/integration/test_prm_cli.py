"""`psgpo models tiny` and `psgpo serve prm` as a user runs them: real subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

PSGPO = [sys.executable, "-m", "services.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PSGPO, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_models_tiny_cli(tmp_path: Path):
    proc = run("models", "tiny", "--out", str(tmp_path / "m"), "--hidden-size", "32", "--num-layers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "policy:" in proc.stdout and "prm:" in proc.stdout
    for name in ("policy", "prm"):
        assert (tmp_path / "m" / name / "model.safetensors").is_file()
        assert (tmp_path / "m" / name / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "m" / "prm").config.num_labels == 1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "policy").config.model_type == "qwen2"


@pytest.mark.parametrize("case", ["missing", "empty", "policy", "garbage"])
def test_serve_prm_refuses_bad_model_dirs(case: str, tmp_path: Path, tiny_models: Path):
    target = {
        "missing": tmp_path / "nope",
        "empty": tmp_path,
        "policy": tiny_models / "policy",
        "garbage": tmp_path / "g",
    }[case]
    if case == "garbage":
        target.mkdir()
        (target / "config.json").write_text("{not json")
    proc = run("serve", "prm", "--model", str(target), "--http-port", "0", "--grpc-port", "0", timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("psgpo: error:"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_prm_without_model_and_bad_port():
    proc = run("serve", "prm", timeout=60)
    assert proc.returncode == 2 and "PRM_MODEL" in proc.stderr
    proc = run("serve", "prm", "--model", "x", "--http-port", "70000", timeout=60)
    assert proc.returncode == 2 and "http_port" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_prm_answers_and_stops_on_sigterm(tiny_models: Path):
    proc = subprocess.Popen(
        [*PSGPO, "serve", "prm", "--model", str(tiny_models / "prm"), "--http-port", "0", "--grpc-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http=127\.0\.0\.1:(\d+) grpc=127\.0\.0\.1:(\d+)", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}"
        resp = httpx.post(f"{url}/v1/score", json={"items": [{"prompt": "", "response": "x = 1\ny = 2"}]})
        assert resp.status_code == 200 and len(resp.json()["results"][0]["lines"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
