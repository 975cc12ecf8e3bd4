"""Data-parallel training across the processes that torchrun or `accelerate launch` start.

The launchers describe the job in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
`init_from_environment` joins that process group (gloo on CPU, NCCL on GPUs). Gradients are summed
with one all-reduce per dtype after the accumulation window, instead of wrapping the model in
DistributedDataParallel: the loss is computed outside `model.forward` (the fused linear +
cross-entropy head), where DDP's forward hooks would not see it, and dividing every rank's loss by the
*global* token count makes N processes compute exactly the one-process gradient.
With one process every function here is a no-op.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_environment() -> None:
    """Join the process group the launcher described; nothing for a single process."""
    if initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def shutdown() -> None:
    if initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if initialized():
        dist.barrier()


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, so token counts stay exact)."""
    if not initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over all ranks: one flat all-reduce per dtype."""
    if not initialized():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for parameter in parameters:
        if parameter.grad is not None:
            by_dtype.setdefault(parameter.grad.dtype, []).append(parameter.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def broadcast_parameters(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Every rank starts from rank 0's trainable weights (they already agree when seeded alike; this makes sure)."""
    if not initialized():
        return
    with torch.no_grad():
        for parameter in parameters:
            dist.broadcast(parameter.data, src=0)
