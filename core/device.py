"""Device, autocast and hardware description shared by importance, distillation and benchmarks."""

import contextlib
import os
import platform

import torch

from slimnas.core.errors import SlimnasError
from slimnas.core.settings import check_precision


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise SlimnasError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimnasError(f"device {requested!r} asked for, but no CUDA GPU is available")
    return device


def native_bf16(device: torch.device) -> bool:
    """Does the device compute bf16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX, through oneDNN)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocasts_bf16(device: torch.device, precision: str) -> bool:
    """bf16 with precision=bf16, and with precision=auto where the device computes bf16 natively; fp32 otherwise.
    Without native bf16 the matmuls are emulated: on an AVX2-only CPU a bf16 matmul ran at 0.6 GFLOP/s against
    14-20 in fp32 (RESULTS.md), so auto never picks it there."""
    return check_precision(precision) != "fp32" and (precision != "auto" or native_bf16(device))


def autocast(device: torch.device, precision: str):
    """bf16 autocast where `autocasts_bf16` says so, else nothing (fp32)."""
    if not autocasts_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict:
    """What a measurement ran on: timings are only comparable between equal descriptions."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": device.type,
        "name": name,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "native_bf16": native_bf16(device),  # precision=auto computes in bf16 only where this is true
    }


def cpu_load() -> float:
    """1-minute load average per core (Linux); above ~1 another process competes for the CPU."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return float("nan")
