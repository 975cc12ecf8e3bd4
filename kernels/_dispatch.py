"""Where each kernel runs: Triton for CUDA tensors, the PyTorch reference for CPU tensors.

Shared by every file in `kernels/`; TRITON_INTERPRET=1 sends CPU tensors through Triton too (tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # triton ships for Linux only (pyproject): the PyTorch references still work
    triton = None


def interpreting() -> bool:
    """True while TRITON_INTERPRET=1: Triton kernels then run in its numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Run the Triton kernel for this tensor? CUDA: yes; CPU: only under the interpreter."""
    if triton is None:
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and interpreting()


def triton_jit(fn):
    """`triton.jit`, or the plain function where triton is not installed (then it is never launched).

    Like `triton.jit` itself, this reads TRITON_INTERPRET once, at import: set the variable before
    anything imports triton (triton.language's own helpers are decorated when triton is imported).
    """
    return fn if triton is None else triton.jit(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def num_warps_for(block_size: int) -> int:
    """Warps for a row-wise kernel over `block_size` columns (Liger's calculate_settings)."""
    if block_size >= 32768:
        return 32
    if block_size >= 8192:
        return 16
    if block_size >= 2048:
        return 8
    return 4


def num_programs(device: torch.device, n_rows: int) -> int:
    """Programs for a persistent row loop: one per SM on a GPU, a few under the interpreter."""
    if device.type == "cuda":
        return max(1, min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))
