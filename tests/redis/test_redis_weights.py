"""Policy-weight sync: publish -> fetch over a shared directory and over gRPC -> sha256 verify;
corrupted blobs refused (the worker keeps its version); versions only go up; events wake waiters."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from psgpo.v1.weights_pb2 import PolicyVersion
from services.common import keys
from services.common.weights import (
    PolicyFollower,
    WeightPublisher,
    WeightsError,
    WeightStore,
    fetch_weights,
    read_policy,
    set_policy,
    sha256_file,
)
from services.common.weights_grpc import WeightsServer

torch = pytest.importorskip("torch", reason="weight tests build tensors: install the ml extra (torch)")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="install the ml extra (safetensors)")


def state_dict(seed: int, rows: int = 64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embed = torch.randn(rows, 32, generator=generator)
    return {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: the same storage under two names
        "layer.bias": torch.arange(7, dtype=torch.bfloat16),
    }


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a tensor byte: the header still parses
    path.write_bytes(bytes(data))


def test_publish_to_a_shared_dir_and_follow(r: redis.Redis, run: str, tmp_path: Path) -> None:
    publisher = WeightPublisher(r, run, tmp_path / "shared")
    follower = PolicyFollower(r, run, tmp_path / "cache")
    assert follower.update() is None  # nothing published yet
    weights = state_dict(1)
    policy = publisher.publish(1, weights)
    assert policy.uri.startswith("file://") and policy.format == "safetensors-full"
    fields = r.hgetall(keys.run_keys(run).policy)
    assert fields[b"version"] == b"1" and fields[b"sha256"].decode() == policy.sha256
    assert fields[b"uri"].decode() == policy.uri and int(fields[b"size"]) == policy.size

    update = follower.update()
    assert update is not None and update.policy == policy and follower.version == 1
    assert sha256_file(update.path) == policy.sha256
    assert_same(update.state_dict(), weights)
    assert follower.update() is None  # up to date


def test_publish_an_existing_safetensors_file_unchanged(r: redis.Redis, run: str, tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    safetensors_torch.save_file({"w": torch.ones(3, 3)}, str(source))
    policy = WeightPublisher(r, run, tmp_path / "shared").publish(1, source)
    assert policy.sha256 == sha256_file(source) and policy.size == source.stat().st_size
    not_weights = tmp_path / "notes.txt"
    not_weights.write_text("hello, this is not a tensor file")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        WeightPublisher(r, run, tmp_path / "shared").publish(2, not_weights)
    current = read_policy(r, run)
    assert current is not None and current.version == 1


def test_versions_only_go_up(r: redis.Redis, run: str, tmp_path: Path) -> None:
    publisher = WeightPublisher(r, run, tmp_path / "shared")
    publisher.publish(1, state_dict(1))
    publisher.publish(5, state_dict(5))
    for stale in (5, 3):
        with pytest.raises(WeightsError, match=f"version {stale} refused: current is 5"):
            publisher.publish(stale, state_dict(stale))
    stale_policy = PolicyVersion(version=4, uri="file:///x", sha256="00" * 32)
    with pytest.raises(WeightsError, match="version 4 refused: current is 5"):
        set_policy(r, run, stale_policy)  # the atomic check, without the publisher's early one
    with pytest.raises(WeightsError, match="start at 1"):
        set_policy(r, run, PolicyVersion(version=0, uri="file:///x", sha256="00" * 32))
    current = read_policy(r, run)
    assert current is not None and current.version == 5
    follower = PolicyFollower(r, run, tmp_path / "cache", version=7)  # a worker ahead of the hash
    assert follower.update() is None and follower.version == 7


def test_a_corrupted_shared_blob_is_refused_and_the_old_version_kept(
    r: redis.Redis, run: str, tmp_path: Path
) -> None:
    publisher = WeightPublisher(r, run, tmp_path / "shared")
    follower = PolicyFollower(r, run, tmp_path / "cache")
    publisher.publish(1, state_dict(1))
    assert follower.update() is not None
    publisher.publish(2, state_dict(2))
    corrupt(publisher.store.path(2))
    with pytest.raises(WeightsError, match=r"policy v2: sha256 of .* expected .*refused"):
        follower.update()
    assert follower.version == 1


def test_publish_and_fetch_over_grpc_in_checksummed_chunks(r: redis.Redis, run: str, tmp_path: Path) -> None:
    weights = state_dict(3, rows=20_000)  # ~2.6 MB: several 1 MiB chunks
    with WeightsServer(tmp_path / "trainer", token="s3cret") as server:
        publisher = WeightPublisher(r, run, tmp_path / "trainer", serve_uri=server.uri)
        policy = publisher.publish(1, weights)
        assert policy.uri == server.uri and policy.size > 2 * (1 << 20)

        update = PolicyFollower(r, run, tmp_path / "worker", token="s3cret").update()
        assert update is not None and update.path.parent == tmp_path / "worker"
        assert sha256_file(update.path) == policy.sha256
        assert_same(update.state_dict(), weights)

        intruder = PolicyFollower(r, run, tmp_path / "intruder", token="wrong")
        with pytest.raises(WeightsError, match="UNAUTHENTICATED"):
            intruder.update()
        assert intruder.version == 0 and not list((tmp_path / "intruder").iterdir())


def test_a_corrupted_grpc_blob_is_refused_and_nothing_is_kept(
    r: redis.Redis, run: str, tmp_path: Path
) -> None:
    with WeightsServer(tmp_path / "trainer") as server:
        publisher = WeightPublisher(r, run, tmp_path / "trainer", serve_uri=server.uri)
        follower = PolicyFollower(r, run, tmp_path / "worker")
        publisher.publish(1, state_dict(1))
        assert follower.update() is not None
        publisher.publish(2, state_dict(2))
        corrupt(publisher.store.path(2))  # rots on the trainer's disk after publishing
        with pytest.raises(WeightsError, match=r"policy v2 from grpc://.*expected .*refused"):
            follower.update()
        assert follower.version == 1
        assert [p.name for p in (tmp_path / "worker").iterdir()] == ["fetched-v000000000001.safetensors"]


def test_a_version_the_server_no_longer_has_is_a_clear_error(
    r: redis.Redis, run: str, tmp_path: Path
) -> None:
    with WeightsServer(tmp_path / "trainer") as server:
        publisher = WeightPublisher(r, run, tmp_path / "trainer", serve_uri=server.uri, keep=1)
        publisher.publish(1, state_dict(1))
        policy = read_policy(r, run)
        publisher.publish(2, state_dict(2))
        assert publisher.store.versions() == [2]
        follower = PolicyFollower(r, run, tmp_path / "worker")
        assert policy is not None
        with pytest.raises(WeightsError, match="NOT_FOUND"):
            fetch_weights(policy, tmp_path / "worker")
        assert follower.update() is not None and follower.version == 2


def test_an_event_wakes_a_waiting_follower(r: redis.Redis, run: str, tmp_path: Path) -> None:
    publisher = WeightPublisher(r, run, tmp_path / "shared")
    follower = PolicyFollower(r, run, tmp_path / "cache")
    listener = r.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(keys.run_keys(run).policy_events)
    timer = threading.Timer(0.3, lambda: publisher.publish(1, state_dict(1)))
    started = time.monotonic()
    timer.start()
    try:
        update = follower.update(timeout_s=10)
    finally:
        timer.join()
        follower.close()
    assert update is not None and update.policy.version == 1
    assert time.monotonic() - started < 5
    message = None
    for _ in range(20):
        message = listener.get_message(timeout=0.1)
        if message:
            break
    listener.close()
    assert message is not None and PolicyVersion.FromString(message["data"]) == update.policy


def test_the_store_prunes_old_versions(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    for version in (1, 2, 3):
        store.put(version, {"w": torch.full((2,), float(version))})
    store.prune(keep=2)
    assert store.versions() == [2, 3]
    assert not store.path(1).with_suffix(".sha256").exists()
    assert store.sha256(3) == sha256_file(store.path(3))
