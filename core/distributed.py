"""Data-parallel runs under torchrun: the process group, who writes, and each rank's share of a batch.

    torchrun --nproc_per_node=2 -m slimnas.cli retrain runs/demo ...

Outside torchrun (no WORLD_SIZE, or 1) every function here is the single-process case: rank 0 of 1.
The backend is gloo on CPU; on CUDA it is NCCL for CUDA tensors and gloo for CPU ones (the logged losses),
each rank on the GPU of its LOCAL_RANK. Only rank 0 writes files, scores and prints. A collective that waits
longer than the group's timeout ends the run, so the ranks share only the training: when it is done they
`leave()` and rank 0 goes on alone (scoring can take longer than any timeout a training step needs).
"""

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from slimnas.core.errors import SlimnasError


def init(timeout_s: float) -> None:
    """Join the process group torchrun describes (once); nothing outside torchrun. `timeout_s`: the longest any
    collective waits for a rank (NCCL's own default is 10 minutes, gloo's 30)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def leave() -> bool:
    """Every rank leaves the process group; True on the one that goes on alone, as a single process (rank 0)."""
    main = is_main()
    if dist.is_initialized():
        gc.collect()  # a DistributedDataParallel left in a reference cycle is torn down now, while its group lives
        dist.destroy_process_group()
    return main


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


def mean(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor averaged over the ranks, outside the autograd graph. Every rank's share of a global batch has the
    same size, so the mean of the ranks' batch means is the global batch's mean."""
    if not dist.is_initialized():
        return tensor.detach()
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / world()
