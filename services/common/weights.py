"""Policy-weight sync through Redis: the trainer publishes version v as one safetensors blob with its
sha256, either in a shared directory (`file://` URI) or served over gRPC in checksummed chunks
(`grpc://host:port`, services.common.weights_grpc); it sets the policy hash and publishes an event.
Rollout workers fetch a newer version, verify the sha256 against the hash and only then switch.

Versions only go up: the hash update is a Lua step that refuses a version <= the current one.
torch and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import redis

from psgpo.v1.weights_pb2 import PolicyVersion
from services.common import keys

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT_FULL = "safetensors-full"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

SET_POLICY_LUA = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if tonumber(ARGV[1]) <= current then
  return redis.error_reply('STALE policy version ' .. ARGV[1] .. ' refused: current is ' .. current)
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'uri', ARGV[2], 'sha256', ARGV[3], 'size', ARGV[4],
  'format', ARGV[5])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
"""


class WeightsError(Exception):
    """A version that cannot be used: stale, unreachable, or failing its checksum. The caller keeps
    the weights it has."""


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def check_safetensors(path: Path) -> None:
    """Refuses a file that does not start with a safetensors header (8-byte length + JSON object)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if not (0 < length <= MAX_HEADER_BYTES and 8 + length <= size and head[8:9] == b"{"):
        raise WeightsError(f"{path} is not a safetensors file")


class WeightStore:
    """Blobs `policy-v{version}.safetensors` with a `.sha256` sidecar in one directory. Files are
    written once (temp file + rename) and never rewritten, so readers see whole blobs only."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def path(self, version: int) -> Path:
        return self.directory / f"policy-v{version:012d}.safetensors"

    def sha256(self, version: int) -> str:
        return self.path(version).with_suffix(".sha256").read_text().strip()

    def versions(self) -> list[int]:
        found = (p.stem.removeprefix("policy-v") for p in self.directory.glob("policy-v*.safetensors"))
        return sorted(int(v) for v in found if v.isdigit())

    def put(self, version: int, weights: Path | str | Mapping[str, Any]) -> tuple[Path, str, int]:
        """Writes the blob of `version` from a .safetensors file or a dict of tensors; returns
        (path, sha256, size)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(version)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            if isinstance(weights, Path | str):
                check_safetensors(Path(weights))
                shutil.copyfile(weights, tmp)
            else:
                _save_tensors(weights, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            digest, size = sha256_file(tmp), tmp.stat().st_size
            sidecar = final.with_suffix(".sha256")
            sidecar.with_suffix(".sha256.tmp").write_text(digest + "\n")
            os.replace(sidecar.with_suffix(".sha256.tmp"), sidecar)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final, digest, size

    def prune(self, keep: int) -> None:
        """Deletes all but the newest `keep` versions."""
        for version in self.versions()[:-keep] if keep > 0 else []:
            self.path(version).unlink(missing_ok=True)
            self.path(version).with_suffix(".sha256").unlink(missing_ok=True)


def _save_tensors(weights: Mapping[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in weights.items():
        tensor = value.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:  # tied weights: safetensors refuses shared storage, so store a copy
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_state_dict(path: Path | str, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


# The policy hash and its events ---------------------------------------------------------------------


def read_policy(r: redis.Redis, run: str) -> PolicyVersion | None:
    """The current version from `psgpo:{run}:policy`, or None before the first publish."""
    fields = {k.decode(): v.decode() for k, v in r.hgetall(keys.run_keys(run).policy).items()}
    if not fields.get("version"):
        return None
    return PolicyVersion(
        version=int(fields["version"]),
        uri=fields.get("uri", ""),
        sha256=fields.get("sha256", ""),
        size=int(fields.get("size") or 0),
        format=fields.get("format") or FORMAT_FULL,
    )


def set_policy(r: redis.Redis, run: str, policy: PolicyVersion) -> None:
    """Sets the policy hash and publishes the PolicyVersion bytes on the events channel, atomically;
    WeightsError when `policy.version` is not above the current one."""
    if policy.version < 1:
        raise WeightsError(f"policy versions start at 1, got {policy.version}")
    k = keys.run_keys(run)
    args = [policy.version, policy.uri, policy.sha256, policy.size, policy.format or FORMAT_FULL]
    try:
        r.eval(SET_POLICY_LUA, 1, k.policy, *args, k.policy_events, policy.SerializeToString())
    except redis.ResponseError as error:
        if "STALE" not in str(error):
            raise
        raise WeightsError(str(error).removeprefix("STALE ") + " (versions only go up)") from error


class WeightPublisher:
    """Trainer side (one publisher per run). Blobs go to `store_dir`; the URI announced is `file://`
    of the blob, or `serve_uri` (`grpc://host:port` of a WeightsServer over the same directory)."""

    def __init__(
        self,
        r: redis.Redis,
        run: str,
        store_dir: Path | str,
        *,
        serve_uri: str | None = None,
        keep: int | None = None,
    ):
        if serve_uri is not None and urlparse(serve_uri).scheme not in ("grpc", "grpcs"):
            raise ValueError(f"serve_uri must be grpc://host:port or grpcs://host:port, got {serve_uri!r}")
        self._r = r
        self.run = keys.validate_run(run)
        self.store = WeightStore(store_dir)
        self.serve_uri = serve_uri
        self.keep = keep

    def publish(self, version: int, weights: Path | str | Mapping[str, Any]) -> PolicyVersion:
        """Writes, hashes and announces `version`; WeightsError when it is not above the current one."""
        current = read_policy(self._r, self.run)
        if current is not None and version <= current.version:
            raise WeightsError(f"policy version {version} refused: current is {current.version}")
        path, digest, size = self.store.put(version, weights)
        uri = self.serve_uri or path.resolve().as_uri()
        policy = PolicyVersion(version=version, uri=uri, sha256=digest, size=size, format=FORMAT_FULL)
        set_policy(self._r, self.run, policy)
        if self.keep:
            self.store.prune(self.keep)
        log.info("published policy v%d (%d bytes) at %s", version, size, uri)
        return policy


def fetch_weights(
    policy: PolicyVersion, cache_dir: Path | str, *, token: str | None = None, timeout_s: float = 600.0
) -> Path:
    """A local path of the blob whose sha256 matches `policy.sha256`: the shared file itself for
    `file://`, a verified download `fetched-v{version}.safetensors` in `cache_dir` for `grpc://`.
    WeightsError otherwise."""
    parsed = urlparse(policy.uri)
    if parsed.scheme == "file":
        path = Path(url2pathname(parsed.path))
        if not path.is_file():
            raise WeightsError(f"policy v{policy.version}: {path} does not exist")
        _verify(policy, path)
        return path
    if parsed.scheme in ("grpc", "grpcs"):
        from services.common.weights_grpc import fetch_over_grpc

        path = Path(cache_dir) / f"fetched-v{policy.version:012d}.safetensors"
        if path.is_file() and sha256_file(path) == policy.sha256:
            return path
        return fetch_over_grpc(policy, path, token=token, timeout_s=timeout_s)
    raise WeightsError(f"policy v{policy.version}: unsupported weights URI {policy.uri!r}")


def _verify(policy: PolicyVersion, path: Path) -> None:
    actual = sha256_file(path)
    if actual != policy.sha256:
        raise WeightsError(
            f"policy v{policy.version}: sha256 of {path} is {actual}, expected {policy.sha256}; refused"
        )


@dataclass(frozen=True, slots=True)
class WeightsUpdate:
    policy: PolicyVersion
    path: Path  # verified blob

    def state_dict(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        return load_state_dict(self.path, device)


class PolicyFollower:
    """Worker side: holds a version and moves only to newer ones, after fetch + checksum.

    follower = PolicyFollower(r, run, cache_dir)
    update = follower.update()            # between generation batches; None: nothing newer
    if update: model.load_state_dict(update.state_dict())
    """

    def __init__(
        self, r: redis.Redis, run: str, cache_dir: Path | str, *, version: int = 0, token: str | None = None
    ):
        self._r = r
        self.run = keys.validate_run(run)
        self.cache_dir = Path(cache_dir)
        self.version = version
        self.token = token
        self._pubsub: redis.client.PubSub | None = None

    def latest(self) -> PolicyVersion | None:
        return read_policy(self._r, self.run)

    def wait_newer(self, timeout_s: float = 0.0) -> PolicyVersion | None:
        """A version newer than the one held, waiting up to timeout_s for an event; None if none.
        The hash is the source of truth: an event only wakes the wait up."""
        if timeout_s > 0 and self._pubsub is None:
            self._pubsub = self._r.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(keys.run_keys(self.run).policy_events)  # before reading the hash
        deadline = time.monotonic() + timeout_s
        while True:
            policy = self.latest()
            if policy is not None and policy.version > self.version:
                return policy
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._pubsub is None:
                return None
            self._pubsub.get_message(timeout=min(remaining, 1.0))

    def update(self, timeout_s: float = 0.0) -> WeightsUpdate | None:
        """The newest version, fetched and verified, or None when nothing is newer. On WeightsError
        (bad checksum, unreachable source) the held version stays."""
        policy = self.wait_newer(timeout_s)
        if policy is None:
            return None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = fetch_weights(policy, self.cache_dir, token=self.token)
        self.version = policy.version
        self._prune_downloads(keep=2)
        log.info("policy v%d ready at %s", policy.version, path)
        return WeightsUpdate(policy, path)

    def close(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()
            self._pubsub = None

    def _prune_downloads(self, keep: int) -> None:
        """Deletes gRPC downloads but the newest `keep` (shared `file://` blobs are never touched)."""
        for old in sorted(self.cache_dir.glob("fetched-v*.safetensors"))[:-keep]:
            old.unlink(missing_ok=True)
