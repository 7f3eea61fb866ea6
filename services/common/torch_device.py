"""Device, dtype and CPU-thread choice shared by every model loader (imports torch only when called)."""

from __future__ import annotations


def resolve_device(device: str, dtype: str, threads: int = 0) -> tuple[str, str]:
    """("auto" -> cuda when present, else cpu; "auto" dtype -> bfloat16 on GPU, float32 on CPU).
    Sets torch's intra-op threads when `threads` > 0. ValueError for a CUDA device without a GPU."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but no CUDA GPU is available")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype
