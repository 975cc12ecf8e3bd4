"""SwiGLU activation `silu(gate) * up` as one Triton kernel per direction.

The MLP of Llama/Mistral/Qwen calls `swiglu` after `kernels/patch.py`, Phi-3's (one fused gate_up_proj)
`swiglu_gate_up`; CPU tensors use the PyTorch references.
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


@triton_jit
def _swiglu_gate_up_forward_kernel(Out, GateUp, stride_in, n_cols, BLOCK: tl.constexpr):
    """Program (row, column block) of a [rows, 2 * n_cols] input holding [gate | up]: no split copies."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(GateUp + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * n_cols + cols, (silu * up).to(Out.dtype.element_ty), mask=mask)


@triton_jit
def _swiglu_gate_up_backward_kernel(DGateUp, DOut, GateUp, stride_in, n_cols, BLOCK: tl.constexpr):
    """Writes [d_gate | d_up] into one [rows, 2 * n_cols] gradient: autograd has no halves to concatenate."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(DOut + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GateUp + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    silu = gate * sigmoid
    d_up = dout * silu.to(DGateUp.dtype.element_ty).to(tl.float32)
    d_gate = dout * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    tl.store(DGateUp + row * 2 * n_cols + cols, d_gate.to(DGateUp.dtype.element_ty), mask=mask)
    tl.store(DGateUp + row * 2 * n_cols + n_cols + cols, d_up.to(DGateUp.dtype.element_ty), mask=mask)


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


class SwiGLUGateUpFunction(torch.autograd.Function):
    """Saves the [gate | up] projection output (what Phi3MLP's eager chunk views keep alive), nothing else."""

    @staticmethod
    def forward(ctx, gate_up):
        shape = gate_up.shape
        gate_up2d = gate_up.reshape(-1, shape[-1])
        if gate_up2d.stride(-1) != 1:
            gate_up2d = gate_up2d.contiguous()
        n_rows, n_cols = gate_up2d.shape[0], shape[-1] // 2
        out = torch.empty((n_rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
        grid = (n_rows, -(-n_cols // BLOCK))
        _swiglu_gate_up_forward_kernel[grid](out, gate_up2d, gate_up2d.stride(0), n_cols, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate_up2d)
        ctx.shape = shape
        return out.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, grad_out):
        (gate_up2d,) = ctx.saved_tensors
        n_rows, n_cols = gate_up2d.shape[0], ctx.shape[-1] // 2
        grad_out = grad_out.reshape(n_rows, n_cols).contiguous()
        grad_gate_up = torch.empty((n_rows, 2 * n_cols), dtype=gate_up2d.dtype, device=gate_up2d.device)
        grid = (n_rows, -(-n_cols // BLOCK))
        _swiglu_gate_up_backward_kernel[grid](
            grad_gate_up, grad_out, gate_up2d, gate_up2d.stride(0), n_cols, BLOCK=BLOCK, num_warps=4
        )
        return grad_gate_up.view(ctx.shape)


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


def swiglu_gate_up_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """What Phi3MLP computes between its projections: `up * act_fn(gate)` of the halves, act_fn = SiLU."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def swiglu_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for `gate_up = [gate | up]` (last dim), read in place: Triton where `swiglu` runs it."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even ([gate | up]), got {tuple(gate_up.shape)}")
    if gate_up.numel() == 0 or not use_triton(gate_up):
        return swiglu_gate_up_reference(gate_up)
    return SwiGLUGateUpFunction.apply(gate_up)
