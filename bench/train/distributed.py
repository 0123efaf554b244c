"""Process-group setup for training: torchrun, submitit, or a plain single process.

Where the ranks come from, in order:
1. a process group that is already initialised (tests that spawn ranks themselves);
2. torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) with WORLD_SIZE > 1;
3. a submitit job with more than one task: `TorchDistributedEnvironment().export()` writes the same
   variables from SLURM's, then env:// initialisation as for torchrun;
4. otherwise one process and no process group (every helper below still works).

Backend: nccl when the rank owns a CUDA device, else gloo (CPU tests run real DDP through gloo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _submitit_tasks() -> int:
    """Tasks of the submitit job this process runs in (0 outside submitit)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 0
    try:
        import submitit

        return int(submitit.JobEnvironment().num_tasks)
    except Exception:  # not actually inside a job (e.g. a stale variable): single process
        return 0


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed() -> DistInfo:
    """Join (or create) the process group described by the environment; see the module docstring."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        device = _device_for(local) if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistInfo(rank, world, local, device)
    if _env_int("WORLD_SIZE", 1) <= 1 and _submitit_tasks() > 1:
        import submitit

        # CUDA_VISIBLE_DEVICES is left alone: the device is picked from LOCAL_RANK as under torchrun.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(0, 1, 0, _device_for(0))
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"WORLD_SIZE={world} but {name} is not set; start the ranks with torchrun "
                               "or submitit, which set it")
    device = _device_for(local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks, returned as a new tensor (the input is not modified)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, in rank order (detached; [tensor] in one process)."""
    if not is_distributed():
        return [tensor.detach()]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return parts


def broadcast_int(value: int, src: int = 0) -> int:
    """`value` as held by rank `src`, on every rank (the value itself in a single process)."""
    if not is_distributed():
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    box = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.broadcast(box, src=src)
    return int(box.item())


def cleanup() -> None:
    """Destroy the process group if this module's caller created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
