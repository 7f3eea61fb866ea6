"""Settings shared by every service; each service subclasses with its own env prefix."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="bind address for HTTP and gRPC")
    http_port: int = Field(0, ge=0, le=65535, description="HTTP port (0: pick a free one)")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    auth_token: SecretStr | None = Field(None, description="bearer token; auth is on when set")
    auth_token_file: Path | None = Field(None, description="file holding the bearer token")
    max_request_bytes: int = Field(16 * 1024 * 1024, gt=0, description="largest accepted request body")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain): HTTPS and gRPC over TLS when set, with tls_key_file"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")

    def token(self) -> str | None:
        """The bearer token from auth_token or auth_token_file (stripped), or None when auth is off."""
        if self.auth_token is not None and self.auth_token.get_secret_value():
            return self.auth_token.get_secret_value()
        if self.auth_token_file is not None:
            value = self.auth_token_file.read_text().strip()
            if not value:
                raise ValueError(f"auth token file {self.auth_token_file} is empty")
            return value
        return None

    def tls(self) -> tuple[Path, Path] | None:
        """(certificate, key) when TLS is on; both set or neither, both readable (one-line error)."""
        from services.common.errors import UserError

        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise UserError("TLS needs both tls_cert_file and tls_key_file (or neither)")
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        for path in (self.tls_cert_file, self.tls_key_file):
            if not path.is_file():
                raise UserError(f"TLS file {path} does not exist")
        return self.tls_cert_file, self.tls_key_file
