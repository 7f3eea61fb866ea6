"""`psgpo label` for real, at small scale: real Redis, a real sandbox server, a real rollout worker
process with the tiny policy serving run `lt-label`.

Known outcomes from a random policy: most tests sample completions with a stop list holding every
character a token of the tiny tokenizer can start with, and one new token at most, so every completion
is empty text and a prefix is correct exactly when prompt + prefix passes the tests by itself. The
responses below are written so that this is monotone, with a known m*. The real-completions test
samples ordinary completions on responses that no completion can rescue (a raise before any
completion runs)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common import keys
from services.common.lines import scored_lines, split_lines
from services.common.runner import Running, start_in_thread
from services.common.streams import connect
from services.sandbox.config import SandboxSettings
from services.sandbox.server import make_factory as sandbox_factory
from trainer.label import binary_search_last_correct, labels_for, read_jsonl
from trainer.label_job import LabelArgs, label
from trainer.label_probes import LabelStopped
from trainer.label_sample import SampleArgs, sample

RUN = "lt"  # the worker process serves run "lt-label"
SQ = {"kind": "assert", "code": "assert f(3) == 9\n"}
HARD = {"kind": "assert", "code": "assert h(1) == 5\n"}
# T = 6, m* = 3: the prefix through "x = 1" passes, "f = None" and later break f.
R1 = "    return x * x\n\n    # square it\n    pass\nx = 1\nf = None\nprint(f(2))\ng = 2\n"
R4 = "    return x * x\n\n    # square it\n    pass\nx = 1\nf = None\nh = 3\nk = 4\n"  # 2 of 3 probes: R1's
R2 = "    raise SystemExit(1)\n    return x * x\n"  # m* = 0
H1 = "    raise ValueError('no')\n    return 5\n"  # m* = 0
H2 = "    return 1"  # T = 1, no trailing newline, m* = 0
F, H = "def f(x):\n", "def h(x):\n"
ROWS: list[dict[str, Any]] = [
    {"task_id": "sq", "prompt": F, "response": R1, "tests": SQ, "checkpoint": "a", "passed": False,
     "reference": "    return x * x\n"},
    {"task_id": "sq", "prompt": F, "response": R1, "tests": SQ, "checkpoint": "b", "passed": False},
    {"task_id": "sq", "prompt": F, "response": R4, "tests": SQ, "checkpoint": "a", "passed": False},
    {"task_id": "sq", "prompt": F, "response": R2, "tests": SQ, "checkpoint": "a", "passed": False},
    {"task_id": "sq", "prompt": F, "response": "    return x * x\n", "tests": SQ},  # the sandbox decides
    {"task_id": "sq", "prompt": F, "response": "\n# nothing here\n", "tests": SQ, "passed": False},
    {"task_id": "hard", "prompt": H, "response": H1, "tests": HARD, "passed": False},
    {"task_id": "hard", "prompt": H, "response": H2, "tests": HARD, "passed": False},
    {"task_id": "badref", "prompt": "def g():\n", "response": "    return 1\n", "passed": True,
     "tests": "assert g() == 1", "reference": "    return 2\n"},
]  # fmt: skip
K = 2


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Running]:
    running = start_in_thread(sandbox_factory(SandboxSettings(http_port=0, grpc_port=0, workers=2)))
    yield running
    running.stop()


def start_worker(tiny_models: Path, redis_url: str, run: str, sandbox: str, tmp: Path) -> subprocess.Popen:
    """`psgpo serve rollout` as a child process (sandbox: gRPC HOST:PORT); returns once it is ready."""
    env = {**os.environ, "ROLLOUT_WEIGHTS_CACHE": str(tmp / "weights"), "ROLLOUT_CONSUMER": f"w-{run}",
           "ROLLOUT_TASKS_PER_BATCH": "16", "ROLLOUT_SCORING_RETRIES": "0",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    args = ["--policy", str(tiny_models / "policy"), "--redis", redis_url, "--run", run, "--sandbox", sandbox]
    with (tmp / f"{run}.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "rollout", *args], env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the worker is ready (or died)
    if "rollout worker ready" not in line:
        proc.kill()
        raise RuntimeError(f"rollout worker did not start: {(tmp / f'{run}.log').read_text()[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def worker(tiny_models, redis_server, sandbox, tmp_path_factory) -> Iterator[subprocess.Popen]:
    target = f"127.0.0.1:{sandbox.grpc_port}"
    proc = start_worker(tiny_models, redis_server.url, f"{RUN}-label", target, tmp_path_factory.mktemp("w"))
    yield proc
    proc.terminate()
    proc.wait(30)
    proc.stdout.close()


@pytest.fixture(scope="module")
def empty_completions(tiny_tokenizer) -> str:
    """Stop strings that end every completion at its first character: one per first character of any
    token (and every printable character). With one new token at most, a token that is only part of a
    UTF-8 character leaves no text either."""
    firsts = {tiny_tokenizer.decode([i])[:1] for i in range(len(tiny_tokenizer))}
    return json.dumps(sorted((firsts | set(string.printable)) - {"", "\ufffd"}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("label") / "responses.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def args_for(out: Path, data: Path, redis_server, sandbox: Running, stop: str, **over: Any) -> LabelArgs:
    base = dict(input=data, out=out, k=K, run=RUN, redis_url=redis_server.url, max_new_tokens=1, stop=stop,
                sandbox_url=f"http://127.0.0.1:{sandbox.http_port}", probe_timeout_s=60.0)  # fmt: skip
    return LabelArgs(**{**base, **over})


@pytest.fixture(scope="module")
def first_run(worker, redis_server, sandbox, empty_completions, data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("first") / "labels.jsonl"
    args = args_for(
        out, data, redis_server, sandbox, empty_completions, strategies="revised-only,remove-hard"
    )
    return out, label(args)


def by_identity(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["task_id"], r["response"], r["checkpoint"]): r for r in records}


def probe(response: str, line: int, passed: int) -> dict[str, int]:
    end = split_lines(response)[line].end
    return {"line": line, "prefix_chars": min(end + 1, len(response)), "k": K, "passed": passed}


def test_labels_with_known_outcomes(first_run) -> None:
    out, report = first_run
    records = read_jsonl(out)
    got = by_identity(records)
    assert len(records) == len(got) == 7
    r1 = got[("sq", R1, "a")]
    assert r1["passed"] is False
    assert r1["labels"] == [1, None, None, 1, 1, -1, -1, -1, None] and r1["first_bad_line"] == 5
    assert r1["line_spans"] == [[ln.start, ln.end] for ln in split_lines(R1)]
    assert r1["probes"] == [probe(R1, 4, K), probe(R1, 6, 0), probe(R1, 5, 0)]  # m = 3, 5, 4
    assert r1["strategy_tags"] == ["revised", "medium"]  # sq: 1 of 5 samples passed
    assert {k: v for k, v in got[("sq", R1, "b")].items() if k != "checkpoint"} == {
        k: v for k, v in r1.items() if k != "checkpoint"
    }
    r4 = got[("sq", R4, "a")]
    assert r4["labels"] == r1["labels"] and r4["probes"] == [
        probe(R4, 4, K),
        probe(R4, 6, 0),
        probe(R4, 5, 0),
    ]
    r2 = got[("sq", R2, "a")]
    assert r2["labels"] == [-1, -1, None] and r2["first_bad_line"] == 0 and r2["probes"] == [probe(R2, 0, 0)]
    assert r2["strategy_tags"] == ["unrecoverable", "medium"]
    r3 = got[("sq", "    return x * x\n", "")]  # "passed" decided by the sandbox
    assert r3["passed"] is True and r3["labels"] == [1, None] and r3["probes"] == []
    assert r3["first_bad_line"] is None and r3["strategy_tags"] == ["passed", "medium"]
    for response in (H1, H2):
        hard = got[("hard", response, "")]
        assert hard["labels"] == labels_for(response, 0)["labels"] and hard["probes"] == [
            probe(response, 0, 0)
        ]
        assert hard["strategy_tags"] == ["unrecoverable", "hard"]
    assert set(records[0]) == {"task_id", "prompt", "response", "checkpoint", "passed", "line_spans",
                               "labels", "first_bad_line", "probes", "strategy_tags"}  # fmt: skip

    # Cost: 12 probes consulted (3 + 3 + 3 + 1 + 1 + 1), 7 distinct prefixes actually sampled.
    run = report["this_run"]
    assert run["probe_tasks"] == 7 and run["completions_generated"] == 7 * K and run["retries"] == 0
    assert run["probes_shared"] == 5 and run["probes_from_earlier_runs"] == 0
    assert run["verdict_runs"] == 2  # the response without "passed" is sq's reference: one run, and badref's
    assert run["sandbox_runs"] == 7 * K + 2
    assert run["skipped"] == {"bad_reference": 1, "no_scored_lines": 1}
    assert run["bad_reference_tasks"] == ["badref"]
    assert (report["failed"], report["passed"], report["revised"]) == (6, 1, 3)
    assert report["completions"] == 12 * K
    assert report["linear_completions"] == K * (6 + 6 + 6 + 2 + 2 + 1) == 46
    assert report["bound_completions"] == K * (4 + 4 + 4 + 2 + 2 + 1) == 34
    assert json.loads(Path(f"{out}.report.json").read_text()) == report

    revised = read_jsonl(Path(f"{out}.revised-only.jsonl"))
    assert sorted(r["checkpoint"] for r in revised) == ["a", "a", "b"] and all(
        r["first_bad_line"] == 5 for r in revised
    )
    assert {r["task_id"] for r in read_jsonl(Path(f"{out}.remove-hard.jsonl"))} == {"sq"}


class WorkerThread:
    """A rollout worker inside this process, until `close()` or `max_tasks` tasks are done."""

    def __init__(
        self, backend, redis_url: str, run: str, sandbox: Running, tmp: Path, max_tasks=None
    ) -> None:
        from services.rollout.config import RolloutSettings

        self.backend, self.max_tasks = backend, max_tasks
        target = f"127.0.0.1:{sandbox.grpc_port}"
        self.settings = RolloutSettings(
            redis_url=redis_url, run=run, sandbox=target, weights_cache=tmp / "cache", consumer=f"t-{run}"
        )
        self.started = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.started.wait(30)

    async def _main(self) -> None:
        from services.rollout.server import run_worker

        self.stop, self.loop = asyncio.Event(), asyncio.get_running_loop()
        r = connect(self.settings.redis_url)
        self.started.set()
        try:
            await run_worker(self.settings, self.backend, r, self.stop, self.max_tasks)
        finally:
            r.close()

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def backend(tiny_models: Path):
    from services.rollout.backend_hf import HfBackend

    b = HfBackend(tiny_models / "policy", max_batch_sequences=16)
    yield b
    b.close()


def test_killed_job_resumes_to_the_same_result_without_repeating_a_probe(
    first_run, backend, redis_server, sandbox, empty_completions, data, tmp_path
) -> None:
    """The job runs in a subprocess on run `lr-label`, whose only worker stops after 3 tasks: one probe
    at a time, so the job holds 3 outcomes and waits on its 4th probe when it is SIGKILLed. The rerun,
    with a worker up, must await that probe instead of sending it again, reuse the 3 cached outcomes,
    and write what the uninterrupted first run wrote."""
    first, _ = first_run
    out = tmp_path / "labels.jsonl"
    cache = Path(f"{out}.probes.jsonl")
    tasks_stream = keys.run_keys("lr-label").tasks
    r = connect(redis_server.url)
    tasks_before = r.xlen(tasks_stream)
    limited = WorkerThread(backend, redis_server.url, "lr-label", sandbox, tmp_path, max_tasks=3)
    command = [sys.executable, "-m", "services.cli", "label", "--input", str(data), "--out", str(out),
               "--k", str(K), "--run", "lr", "--redis-url", redis_server.url, "--max-new-tokens", "1",
               "--stop", empty_completions, "--sandbox-url", f"http://127.0.0.1:{sandbox.http_port}",
               "--max-inflight", "1"]  # fmt: skip
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        limited.thread.join(60)
        assert not limited.thread.is_alive()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and job.poll() is None:  # the file may end mid-line: count
            text = cache.read_text() if cache.exists() else ""
            if text.count('{"probe"') == 3 and text.count('{"submitted"') == 4:
                break
            time.sleep(0.02)
    finally:
        job.send_signal(signal.SIGKILL)
        _, stderr = job.communicate()
    assert job.returncode == -signal.SIGKILL, stderr
    assert not Path(f"{out}.report.json").exists()  # killed mid-run
    rows = read_jsonl(cache)
    answered = {row["probe"] for row in rows if "probe" in row}
    in_flight = {row["submitted"] for row in rows if "submitted" in row} - answered
    assert len(answered) == 3 and len(in_flight) == 1

    rescuer = WorkerThread(backend, redis_server.url, "lr-label", sandbox, tmp_path)
    try:
        report = label(
            args_for(out, data, redis_server, sandbox, empty_completions, run="lr", max_inflight=1)
        )
    finally:
        rescuer.close()

    def canonical(path: Path) -> list[str]:
        return sorted(json.dumps(row, sort_keys=True) for row in read_jsonl(path))

    assert canonical(out) == canonical(first)
    assert report["this_run"]["probe_tasks"] == 3  # 7 prefixes: 3 cached, 1 awaited, 3 new
    assert report["this_run"]["probes_from_earlier_runs"] >= 3
    assert report["completions"] == 12 * K and report["failed"] == 6
    rows = read_jsonl(cache)
    results = Counter(row["probe"] for row in rows if "probe" in row)
    submitted = Counter(row["submitted"] for row in rows if "submitted" in row)
    assert len(results) == 7 and max(results.values()) == 1 and max(submitted.values()) == 1
    assert r.xlen(tasks_stream) - tasks_before == 7  # the killed run and the rerun sampled each prefix once
    r.close()


def test_real_completions_cannot_rescue_a_raise(worker, redis_server, sandbox, tmp_path) -> None:
    rows = [row for row in ROWS if row["task_id"] == "hard"]
    data = tmp_path / "hard.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = label(
        args_for(tmp_path / "out.jsonl", data, redis_server, sandbox, "[]", max_new_tokens=6, seed=5)
    )
    records = read_jsonl(tmp_path / "out.jsonl")
    assert len(records) == 2 and report["this_run"]["probe_tasks"] == 2
    for record in records:
        assert 1 not in record["labels"] and record["first_bad_line"] == 0
        assert [(p["k"], p["passed"]) for p in record["probes"]] == [(K, 0)]


def test_sample_then_label_real_responses(backend, worker, redis_server, sandbox, tmp_path) -> None:
    """The input made by `sample` from the tiny policy, labelled with real completions: outcomes are
    unknown, but every record must be what a binary search over its own probes gives."""
    samples = tmp_path / "samples.jsonl"
    sampler = WorkerThread(backend, redis_server.url, f"{RUN}-sample", sandbox, tmp_path)
    try:
        sample_args = SampleArgs(out=samples, n=3, run=RUN, redis_url=redis_server.url, checkpoint="tiny-0",
                                 max_new_tokens=12, seed=3, timeout_s=60)  # fmt: skip
        assert sample(sample_args) == 15  # builtin:tiny: 5 tasks
    finally:
        sampler.close()
    rows = read_jsonl(samples)
    assert {row["task_id"] for row in rows} == {"one", "two", "inc", "ident", "const"}
    assert all(row["checkpoint"] == "tiny-0" and row["tests"]["kind"] == "assert" for row in rows)
    assert all(row["passed"] for row in rows if row["task_id"] in ("one", "two"))  # a comment: passes

    out = tmp_path / "labels.jsonl"
    report = label(args_for(out, samples, redis_server, sandbox, "[]", max_new_tokens=6, seed=5))
    records = read_jsonl(out)
    failed = [r for r in records if not r["passed"]]
    assert failed, "the tiny policy passed everything: nothing was searched"
    assert report["failed"] == len(failed) and report["completions"] <= report["bound_completions"]
    for record in records:
        scored = scored_lines(split_lines(record["response"]))
        if record["passed"]:
            assert (
                record["probes"] == []
                and record["labels"] == labels_for(record["response"], len(scored))["labels"]
            )
            continue
        outcome = {p["line"]: p["passed"] > 0 for p in record["probes"]}
        memo = {m: outcome[line.index] for m, line in enumerate(scored, 1) if line.index in outcome}
        m_star, log = binary_search_last_correct(
            len(scored), lambda m: pytest.fail(f"prefix {m} not probed"), memo
        )
        assert [scored[m - 1].index for m, _ in log] == [p["line"] for p in record["probes"]]
        assert record["labels"] == labels_for(record["response"], m_star)["labels"]


def test_outages_stop_with_a_resumable_state(tiny_models, redis_server, sandbox, data, tmp_path) -> None:
    down = args_for(tmp_path / "a.jsonl", data, redis_server, sandbox, "[]", sandbox_url="http://127.0.0.1:9")
    with pytest.raises(LabelStopped, match="sandbox at http://127.0.0.1:9 failed.*rerun the same command"):
        label(down)
    # No rollout worker serves "nobody-label": each probe times out, is sent again once, then the job
    # stops; what it submitted is recorded, so a rerun with workers up waits for those tasks.
    rows = [row for row in ROWS if row["task_id"] == "hard"]
    hard = tmp_path / "hard.jsonl"
    hard.write_text("".join(json.dumps(row) + "\n" for row in rows))
    nobody = args_for(tmp_path / "b.jsonl", hard, redis_server, sandbox, "[]", run="nobody",
                      probe_timeout_s=0.5, probe_attempts=2)  # fmt: skip
    with pytest.raises(LabelStopped, match="failed 2 times: no complete result within 0.5s.*'nobody-label'"):
        label(nobody)
    submitted = [
        row for row in read_jsonl(Path(f"{tmp_path / 'b.jsonl'}.probes.jsonl")) if "submitted" in row
    ]
    assert sorted(row["attempt"] for row in submitted) == [1, 1, 2, 2]
    # A worker whose sandbox is down writes trajectories without verdicts: never an outcome, the probe
    # is sent again, then the job stops.
    blind = start_worker(tiny_models, redis_server.url, "blind-label", "127.0.0.1:9", tmp_path)
    try:
        no_sandbox = args_for(tmp_path / "c.jsonl", hard, redis_server, sandbox, "[]", run="blind",
                              max_new_tokens=2, probe_attempts=2)  # fmt: skip
        with pytest.raises(LabelStopped, match="failed 2 times: the sandbox could not judge its completions"):
            label(no_sandbox)
    finally:
        blind.terminate()
        blind.wait(30)
        blind.stdout.close()


def test_bad_input_is_one_line(redis_server, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "t", "prompt": "x = ", "response": "1", "tests": "assert x"}\nnot json\n')
    for argv, needle in [
        (
            ["--input", str(bad), "--k", "0", "--max-new-tokens", "0"],
            "--k must be in 1..1024, got 0; --max-new",
        ),
        (["--input", str(bad), "--out", str(tmp_path / "o.jsonl")], f"{bad}:2: not JSON"),
        (["--input", str(bad), "--stop", "\\n"], "--stop must be a JSON list"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "label", *argv], capture_output=True, text=True
        )
        assert done.returncode == 2 and done.stderr.startswith("psgpo: error: ") and needle in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
