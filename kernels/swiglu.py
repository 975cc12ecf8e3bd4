"""SwiGLU activation `silu(gate) * up` as one Triton kernel per direction.

The MLP of Llama/Mistral/Qwen calls it after `kernels/patch.py`; CPU tensors use the PyTorch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cptflow.kernels._dispatch import triton_jit, use_triton

try:
    import triton.language as tl
except ImportError:
    tl = None

BLOCK = 1024


@triton_jit
def _swiglu_forward_kernel(Out, Gate, Up, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(Gate + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(Up + offsets, mask=mask, other=0.0).to(tl.float32)
    # Eager rounds silu(gate) to the activation dtype before the product: do the same.
    silu = (gate * tl.sigmoid(gate)).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + offsets, (silu * up).to(Out.dtype.element_ty), mask=mask)


@triton_jit
def _swiglu_backward_kernel(DGate, DUp, DOut, Gate, Up, n_elements, BLOCK: tl.constexpr):
    """Recomputes sigmoid(gate) from the saved inputs: no [tokens, intermediate] activation is kept."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dout = tl.load(DOut + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(Gate + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(Up + offsets, mask=mask, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    silu = gate * sigmoid
    d_up = dout * silu.to(DUp.dtype.element_ty).to(tl.float32)
    # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    d_gate = dout * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    tl.store(DGate + offsets, d_gate.to(DGate.dtype.element_ty), mask=mask)
    tl.store(DUp + offsets, d_up.to(DUp.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """Saves gate and up (the MLP holds them anyway for the projections' backward), nothing else."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_forward_kernel[(-(-n // BLOCK),)](out, gate, up, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_backward_kernel[(-(-n // BLOCK),)](grad_gate, grad_up, grad_out, gate, up, n, BLOCK=BLOCK, num_warps=4)
        return grad_gate, grad_up


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What LlamaMLP computes between its projections: `act_fn(gate) * up` with act_fn = SiLU."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: Triton on CUDA (or under TRITON_INTERPRET=1), else PyTorch."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    # Mixed dtypes: leave the type promotion to eager PyTorch.
    if gate.numel() == 0 or gate.dtype != up.dtype or not use_triton(gate):
        return swiglu_reference(gate, up)
    return SwiGLUFunction.apply(gate, up)
