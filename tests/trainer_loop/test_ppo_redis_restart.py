"""Redis crashes (SIGKILL, AOF on) and comes back on the same port while the trainer runs: the trainer
rides it out (reads, acknowledgements and the weight publish are retried) instead of exiting, and every
trajectory is still trained on exactly once. Found by the chaos suite (services/chaos.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from services.common import keys
from services.common.redis_local import start_redis
from services.common.streams import connect
from services.common.weights import read_policy
from tests.trainer_loop.helpers import fill_stream, make_trajectories, ppo_args
from tests.trainer_loop.test_ppo_resume import check_exactly_once


def test_trainer_rides_out_a_redis_restart(tiny_models: Path, tmp_path: Path) -> None:
    from trainer.ppo import train

    data = tmp_path / "redis"
    server = start_redis(data_dir=data, appendonly=True, appendfsync="always")
    port = server.port
    run, out, steps, per_step = "redis-restart", tmp_path / "out", 6, 4
    try:
        r = connect(server.url)
        fill_stream(r, run, make_trajectories(tiny_models / "policy", 8, seed=5), steps * per_step, "rr")
        args = ppo_args(tiny_models, server.url, run, out, steps=steps, trajectories_per_step=per_step,
                        task_source="none", batch_timeout_s=60, update_epochs=1)  # fmt: skip
        errors: list[BaseException] = []

        def target() -> None:
            try:
                train(args)
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        trainer = threading.Thread(target=target, daemon=True)
        trainer.start()
        pointer = out / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and trainer.is_alive():
            if pointer.is_file() and pointer.read_text().strip() >= "step-00000002":
                break
            time.sleep(0.01)
        assert trainer.is_alive(), errors
        server.kill()  # a crash: no shutdown save
        time.sleep(1.5)
        server = start_redis(port=port, data_dir=data, appendonly=True, appendfsync="always")
        trainer.join(180)
        assert not trainer.is_alive(), "the trainer did not finish"
        assert not errors, f"the trainer died: {errors[0]!r}"
        r = connect(server.url)
        check_exactly_once(r, run, out, steps=steps, per_step=per_step)
        policy = read_policy(r, run)
        assert policy is not None and policy.version == steps  # every step published once, in order
        assert not r.exists(keys.run_keys(run).dead)  # nothing dead-lettered on the way
    finally:
        server.stop()
