"""GeGLU activation `gelu_tanh(gate) * up` (Gemma's MLP) as one Triton kernel per direction.

The MLP of Gemma 1/2/3 calls it after `kernels/patch.py`; CPU tensors use the PyTorch reference.
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
def _gelu_tanh_parts(gate):
    """(gelu_tanh(g), d gelu_tanh / dg) in fp32: 0.5 g (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3).

    With e = exp(-2|u|) <= 1: 1 + tanh(u) = 2 / (1 + e) for u >= 0, 2e / (1 + e) below, and
    sech^2(u) = 4e / (1 + e)^2. No overflow (the interpreter has no libdevice tanh), and no
    cancellation in 1 + tanh or 1 - tanh^2 for large |u|.
    """
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    e = tl.exp(-2.0 * tl.abs(inner))
    one_plus_tanh = tl.where(inner >= 0, 2.0, 2.0 * e) / (1.0 + e)
    sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
    d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * gate * gate)
    gelu = 0.5 * gate * one_plus_tanh
    d_gelu = 0.5 * one_plus_tanh + 0.5 * gate * sech2 * d_inner
    return gelu, d_gelu


@triton_jit
def _geglu_forward_kernel(Out, Gate, Up, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(Gate + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(Up + offsets, mask=mask, other=0.0).to(tl.float32)
    gelu, _ = _gelu_tanh_parts(gate)
    # Eager rounds gelu(gate) to the activation dtype before the product: do the same.
    gelu = gelu.to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + offsets, (gelu * up).to(Out.dtype.element_ty), mask=mask)


@triton_jit
def _geglu_backward_kernel(DGate, DUp, DOut, Gate, Up, n_elements, BLOCK: tl.constexpr):
    """Recomputes gelu(gate) from the saved inputs: no [tokens, intermediate] activation is kept."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dout = tl.load(DOut + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(Gate + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(Up + offsets, mask=mask, other=0.0).to(tl.float32)
    gelu, d_gelu = _gelu_tanh_parts(gate)
    d_up = dout * gelu.to(DUp.dtype.element_ty).to(tl.float32)
    d_gate = dout * up * d_gelu
    tl.store(DGate + offsets, d_gate.to(DGate.dtype.element_ty), mask=mask)
    tl.store(DUp + offsets, d_up.to(DUp.dtype.element_ty), mask=mask)


class GeGLUFunction(torch.autograd.Function):
    """Saves gate and up (the MLP holds them anyway for the projections' backward), nothing else."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _geglu_forward_kernel[(-(-n // BLOCK),)](out, gate, up, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _geglu_backward_kernel[(-(-n // BLOCK),)](grad_gate, grad_up, grad_out, gate, up, n, BLOCK=BLOCK, num_warps=4)
        return grad_gate, grad_up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What GemmaMLP computes between its projections: `act_fn(gate) * up` with act_fn = gelu_pytorch_tanh."""
    return F.gelu(gate, approximate="tanh") * up


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up: Triton on CUDA (or under TRITON_INTERPRET=1), else PyTorch."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    # Mixed dtypes: leave the type promotion to eager PyTorch.
    if gate.numel() == 0 or gate.dtype != up.dtype or not use_triton(gate):
        return geglu_reference(gate, up)
    return GeGLUFunction.apply(gate, up)
