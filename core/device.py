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


def autocast(device: torch.device, precision: str):
    """bf16 autocast by default on CUDA and on CPU too (bf16 matmul measured ~3x fp32 on this CPU)."""
    if check_precision(precision) == "fp32":
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
    }


def cpu_load() -> float:
    """1-minute load average per core (Linux); above ~1 another process competes for the CPU."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return float("nan")
