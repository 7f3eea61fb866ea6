"""gRPC channels for the typed clients: plaintext by default, TLS on request.

`tls`: None or False: plaintext; True: TLS trusting the system's CA roots; a path (or PEM bytes): TLS
trusting that CA (e.g. the self-signed certificate given to the service as *_TLS_CERT_FILE). A target
written `grpcs://host:port` turns TLS on with the system roots; `grpc://host:port` is plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

TlsOption = bool | str | Path | bytes | None


def _split(target: str, tls: TlsOption) -> tuple[str, TlsOption]:
    for scheme, secure in (("grpcs://", True), ("grpc://", False)):
        if target.startswith(scheme):
            return target[len(scheme) :], tls if tls not in (None, False) else secure
    return target, tls


def _credentials(tls: TlsOption) -> grpc.ChannelCredentials | None:
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    pem = tls if isinstance(tls, bytes) else Path(tls).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=pem)


def make_channel(target: str, options: Sequence[tuple[str, Any]], tls: TlsOption = None) -> grpc.Channel:
    address, tls = _split(target, tls)
    credentials = _credentials(tls)
    if credentials is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, credentials, options=list(options))


def make_aio_channel(
    target: str, options: Sequence[tuple[str, Any]], tls: TlsOption = None
) -> grpc.aio.Channel:
    address, tls = _split(target, tls)
    credentials = _credentials(tls)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, credentials, options=list(options))
