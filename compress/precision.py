"""Device and autocast choice shared by importance, distillation and benchmarks."""

import contextlib

import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast(device: torch.device, precision: str):
    """bf16 autocast by default on CUDA and on CPU too (bf16 matmul measured ~3x fp32 on this CPU)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "auto"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
