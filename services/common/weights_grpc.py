"""WeightsService over gRPC: the trainer serves the blobs of a WeightStore in checksummed chunks;
workers download one version, checking every chunk and the whole blob against the policy hash.

`WeightsServer` runs the grpc.aio server on a background thread, for a synchronous trainer loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import grpc

from psgpo.v1 import weights_pb2, weights_pb2_grpc
from psgpo.v1.weights_pb2 import PolicyVersion
from services.common.grpc_util import build_server, set_serving
from services.common.weights import WeightsError, WeightStore

log = logging.getLogger(__name__)

SERVICE_NAME = "psgpo.v1.WeightsService"
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 64 << 10, 3 << 20  # under gRPC's 4 MiB default message limit


class WeightsServicer(weights_pb2_grpc.WeightsServiceServicer):
    """Streams `policy-v{version}.safetensors` from the store; version 0 means the newest."""

    def __init__(self, store: WeightStore, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.store = store
        self.chunk_bytes = chunk_bytes

    async def Fetch(
        self, request: weights_pb2.FetchWeightsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[weights_pb2.WeightChunk]:
        versions = self.store.versions()
        version = request.version or (versions[-1] if versions else 0)
        if version not in versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"policy version {request.version} is not served")
        path = self.store.path(version)
        total_sha256 = self.store.sha256(version)
        size = path.stat().st_size
        chunk_bytes = min(max(request.chunk_bytes or self.chunk_bytes, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
        with open(path, "rb") as f:
            offset = 0
            while data := await asyncio.to_thread(f.read, chunk_bytes):
                yield weights_pb2.WeightChunk(
                    version=version,
                    offset=offset,
                    data=data,
                    sha256=hashlib.sha256(data).hexdigest(),
                    total_size=size,
                    total_sha256=total_sha256,
                )
                offset += len(data)


class WeightsServer:
    """A WeightsService (with health, reflection and optional bearer auth) on a background thread.

    with WeightsServer(store_dir, port=0) as server:
        publisher = WeightPublisher(r, run, store_dir, serve_uri=server.uri)
    """

    def __init__(
        self,
        store_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        advertise_host: str | None = None,
    ):
        self.store = WeightStore(store_dir)
        self.host, self.port, self.token = host, port, token
        self.advertise_host = advertise_host or host
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="weights-grpc", daemon=True)

    @property
    def uri(self) -> str:
        return f"grpc://{self.advertise_host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> WeightsServer:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise WeightsError(f"weights gRPC server did not start within {timeout_s}s")
        if self._error is not None:
            raise WeightsError(f"weights gRPC server failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout_s)

    def __enter__(self) -> WeightsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # reported to start(); the thread ends either way
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        servicer = WeightsServicer(self.store)
        server, self.port, health = build_server(
            [lambda s: weights_pb2_grpc.add_WeightsServiceServicer_to_server(servicer, s)],
            [SERVICE_NAME],
            self.host,
            self.port,
            self.token,
            max_message_bytes=1 << 20,
        )
        await server.start()
        await set_serving(health, [SERVICE_NAME], True)
        self._ready.set()
        await self._stopping.wait()
        await server.stop(grace=2.0)


def fetch_over_grpc(
    policy: PolicyVersion, dest: Path, *, token: str | None = None, timeout_s: float = 600.0
) -> Path:
    """Downloads `policy.version` from `policy.uri` (grpc:// or grpcs://) into `dest`, checking each
    chunk's sha256, the offsets, and the whole blob's size and sha256 against `policy`."""
    parsed = urlparse(policy.uri)
    target = parsed.netloc
    options = [("grpc.max_receive_message_length", MAX_CHUNK_BYTES + (1 << 20))]
    if parsed.scheme == "grpcs":
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    request = weights_pb2.FetchWeightsRequest(version=policy.version)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    total = hashlib.sha256()
    offset = 0
    try:
        with channel, open(tmp, "wb") as f:
            for chunk in weights_pb2_grpc.WeightsServiceStub(channel).Fetch(
                request, timeout=timeout_s, metadata=metadata
            ):
                _check_chunk(policy, chunk, offset)
                f.write(chunk.data)
                total.update(chunk.data)
                offset += len(chunk.data)
            f.flush()
            os.fsync(f.fileno())
        if offset != policy.size or total.hexdigest() != policy.sha256:
            raise WeightsError(
                f"policy v{policy.version} from {policy.uri}: got {offset} bytes with sha256 "
                f"{total.hexdigest()}, expected {policy.size} bytes with {policy.sha256}; refused"
            )
        os.replace(tmp, dest)
    except grpc.RpcError as error:
        reason = f"{error.code().name} {error.details()}"
        raise WeightsError(f"policy v{policy.version}: fetch from {policy.uri} failed: {reason}") from error
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _check_chunk(policy: PolicyVersion, chunk: weights_pb2.WeightChunk, offset: int) -> None:
    where = f"policy v{policy.version} from {policy.uri}, chunk at offset {chunk.offset}"
    if chunk.version != policy.version:
        raise WeightsError(f"{where}: server sent version {chunk.version}")
    if chunk.offset != offset:
        raise WeightsError(f"{where}: expected offset {offset}")
    if chunk.total_sha256 != policy.sha256:
        raise WeightsError(f"{where}: server's blob sha256 {chunk.total_sha256} is not {policy.sha256}")
    if hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
        raise WeightsError(f"{where}: chunk fails its sha256")
