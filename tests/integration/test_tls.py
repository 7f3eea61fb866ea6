"""Optional TLS: with PRM_/SANDBOX_TLS_CERT_FILE and _KEY_FILE the services speak HTTPS and gRPC over
TLS (a self-signed certificate made here); clients that trust it get answers, plaintext clients do not;
a half-configured TLS setting is a one-line error."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common.errors import UserError
from services.common.runner import start_in_thread
from services.prm.client import PrmError, PrmGrpcClient
from services.sandbox.client import AssertTests, RetryPolicy, SandboxError, SandboxGrpcClient
from services.sandbox.config import SandboxSettings
from services.sandbox.server import make_factory as sandbox_factory
from tests.integration.conftest import start_prm


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_prm_over_https_and_grpc_tls(tiny_models: Path, tmp_path: Path):
    cert, key = self_signed(tmp_path)
    running = start_prm(tiny_models / "prm", tls_cert_file=cert, tls_key_file=key)
    try:
        body = {"items": [{"prompt": "", "response": "x = 1\n"}]}
        trust = ssl.create_default_context(cafile=cert)
        ok = httpx.post(f"https://127.0.0.1:{running.http_port}/v1/score", json=body, verify=trust)
        assert ok.status_code == 200 and ok.json()["results"][0]["lines"]
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{running.http_port}/v1/score", json=body, timeout=5)
        target = f"127.0.0.1:{running.grpc_port}"
        with PrmGrpcClient(target, tls=cert) as client:
            assert len(client.score([("", "x = 1\n")])) == 1
        with PrmGrpcClient(target, retries=0, timeout=5) as plain, pytest.raises(PrmError):
            plain.score([("", "x = 1\n")])
    finally:
        running.stop()


def test_sandbox_grpc_over_tls(tmp_path: Path):
    cert, key = self_signed(tmp_path)
    settings = SandboxSettings(http_port=0, grpc_port=0, workers=1, tls_cert_file=cert, tls_key_file=key)
    running = start_in_thread(sandbox_factory(settings))
    try:
        with SandboxGrpcClient(f"127.0.0.1:{running.grpc_port}", tls=cert) as client:
            result = client.run("def f():\n    return 1\n", AssertTests("assert f() == 1\n"))
        assert result.passed
        one_try = RetryPolicy(attempts=1)
        with SandboxGrpcClient(f"127.0.0.1:{running.grpc_port}", timeout_s=5, retry=one_try) as plain:
            with pytest.raises(SandboxError):
                plain.run("x = 1\n", AssertTests("assert x == 1\n"))
    finally:
        running.stop()


def test_half_configured_tls_is_a_one_line_error(tmp_path: Path):
    cert, _ = self_signed(tmp_path)
    with pytest.raises(UserError, match="both tls_cert_file and tls_key_file"):
        SandboxSettings(tls_cert_file=cert).tls()
    with pytest.raises(UserError, match="does not exist"):
        SandboxSettings(tls_cert_file=cert, tls_key_file=tmp_path / "missing.pem").tls()
