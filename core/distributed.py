"""Data-parallel runs under torchrun: the process group, who writes, and each rank's share of a batch.

    torchrun --nproc_per_node=2 -m slimnas.cli retrain runs/demo ...

Outside torchrun (no WORLD_SIZE, or 1) every function here is the single-process case: rank 0 of 1.
The backend is gloo on CPU and NCCL on CUDA (each rank on the GPU of its LOCAL_RANK). Only rank 0
writes files, scores and prints; the others train their share and wait for it at `barrier()`.
"""

import os

import torch
import torch.distributed as dist

from slimnas.core.errors import SlimnasError


def init() -> None:
    """Join the process group torchrun describes (once); nothing outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_batch(batch_size: int) -> None:
    """A global batch splits evenly over the processes, or the run stops here with one line."""
    if batch_size % world():
        raise SlimnasError(
            f"distill.batch_size={batch_size} does not split evenly over {world()} processes: "
            "use a multiple of the process count"
        )


def share(rows: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (rank r takes rows r, r + world, ...)."""
    return rows[rank() :: world()]


def mean(values: list[float]) -> list[float]:
    """Per-rank numbers averaged over the ranks (for logs: every rank logs the global batch's loss)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / world()).tolist()
