"""PRM service settings (env prefix PRM_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

Aggregate = Literal["min", "mean", "last"]


class PrmSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PRM_", extra="ignore", validate_default=True)

    model: Path | None = Field(None, description="PRM dir (AutoModelForTokenClassification, num_labels=1)")
    http_port: int = Field(8001, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    max_batch_tokens: int = Field(16384, gt=0, description="padded tokens per forward batch")
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="extra wait to fill a batch (0: run at once)")
    max_queue_items: int = Field(4096, gt=0, description="pending items before 429 / RESOURCE_EXHAUSTED")
    max_items_per_request: int = Field(512, gt=0)
    max_length: int = Field(0, ge=0, description="max prompt+response tokens (0: the model's own limit)")
    reward_aggregate: Aggregate = Field("min", description="aggregate used by /get_reward and GetReward")
    backend: Literal["hf", "vllm"] = Field("hf", description="hf (transformers) or vllm (pooling model, GPU)")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vllm: fraction of GPU memory for the PRM (leave room for a policy)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs the PRM is sharded over")
