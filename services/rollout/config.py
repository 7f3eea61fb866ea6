"""Rollout worker settings (env prefix ROLLOUT_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RolloutSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROLLOUT_", extra="ignore", validate_default=True)

    policy: Path | None = Field(None, description="initial policy dir (AutoModelForCausalLM)")
    backend: Literal["hf", "vllm"] = "hf"
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL")
    run: str = Field("default", description="run name: keys are psgpo:{run}:...")
    prm: str | None = Field(None, description="PRM gRPC target host:port (None: no PRM scores)")
    sandbox: str = Field("127.0.0.1:50052", description="sandbox gRPC target host:port")
    prm_token: SecretStr | None = Field(None, description="bearer token for the PRM service")
    sandbox_token: SecretStr | None = Field(None, description="bearer token for the sandbox service")
    prm_token_file: Path | None = Field(None, description="file holding the PRM bearer token")
    sandbox_token_file: Path | None = Field(None, description="file holding the sandbox bearer token")

    def tokens(self) -> tuple[str | None, str | None]:
        """(PRM token, sandbox token), each from its value or its file (stripped)."""

        def one(value: SecretStr | None, path: Path | None) -> str | None:
            if value is not None and value.get_secret_value():
                return value.get_secret_value()
            if path is not None:
                text = path.read_text().strip()
                if not text:
                    raise ValueError(f"token file {path} is empty")
                return text
            return None

        return one(self.prm_token, self.prm_token_file), one(self.sandbox_token, self.sandbox_token_file)

    consumer: str | None = Field(None, description="consumer name in group `rollout` (default host-pid)")
    tasks_per_batch: int = Field(8, gt=0, description="tasks read and generated together")
    max_backlog: int = Field(1024, gt=0, description="pause while this many trajectories are unconsumed")
    claim_idle_ms: int = Field(120_000, gt=0, description="reclaim tasks a dead worker held this long")
    max_deliveries: int = Field(5, gt=0, description="dead-letter a task after this many deliveries")
    scoring_retries: int = Field(3, ge=0, description="retries of a failed sandbox/PRM call")
    scoring_timeout_s: float = Field(120.0, gt=0)
    sandbox_timeout_s: float = Field(10.0, gt=0, description="per-run time limit sent to the sandbox")
    weights_cache: Path = Field(Path("runs/rollout-weights"), description="where fetched weights land")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port (0: off)")
    max_batch_sequences: int = Field(64, gt=0, description="sequences per generation batch")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vllm backend: fraction of GPU memory for weights + KV cache"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: GPUs the policy is sharded over")
    pipeline: Literal["auto", "on", "off"] = Field(
        "auto",
        description="generate batch k+1 while batch k is scored; auto: on when generating on a GPU "
        "(on a small CPU the overlap oversubscribes the cores and is slower)",
    )
    log_level: str = "INFO"
