"""RMSNorm as one Triton kernel per direction, numerically matching Hugging Face's LlamaRMSNorm or GemmaRMSNorm.

Installed into Llama/Mistral/Qwen/Phi-3 (`rms_norm`) and Gemma 1/2/3 (`gemma_rms_norm`) models by
`kernels/patch.py`; CPU tensors use the PyTorch references.
"""

from __future__ import annotations

import torch

from cptflow.kernels._dispatch import next_power_of_2, num_programs, num_warps_for, triton_jit, use_triton

try:
    import triton.language as tl
except ImportError:
    tl = None


@triton_jit
def _rms_norm_forward_kernel(
    Y, X, W, InvRms, stride_y, stride_x, n_cols, eps, GEMMA: tl.constexpr, BLOCK: tl.constexpr
):
    """One program per row. Llama: y = w * (x / rms(x)), the normalised row rounded to x's dtype first.
    GEMMA: y = (1 + w) * (x / rms(x)), all in fp32, rounded once at the end."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(InvRms + row, inv_rms)
    if GEMMA:
        y = (x * inv_rms) * (1.0 + w)
    else:
        # HF's Llama casts the normalised row back to the input dtype *before* the weight multiply.
        y = (x * inv_rms).to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton_jit
def _rms_norm_backward_kernel(
    DX,
    DY,
    X,
    W,
    InvRms,
    DWPartial,
    stride_dx,
    stride_dy,
    stride_x,
    n_rows,
    n_cols,
    rows_per_program,
    COMPUTE_DW: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Persistent programs over row ranges; each sums its rows' weight gradient in registers."""
    program = tl.program_id(0)
    row_start = program * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    dw = tl.zeros([BLOCK], dtype=tl.float32)

    # Pointers advance row by row: 64-bit from the start, so rows * stride cannot overflow int32.
    dx_ptr = DX + row_start.to(tl.int64) * stride_dx
    dy_ptr = DY + row_start.to(tl.int64) * stride_dy
    x_ptr = X + row_start.to(tl.int64) * stride_x
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.load(InvRms + row)
        x_normed = x * inv_rms
        dx_normed = dy * w
        # d/dx of x * inv_rms(x): inv_rms * (g - x_normed * mean(g * x_normed)).
        dx = inv_rms * (dx_normed - x_normed * (tl.sum(dx_normed * x_normed, axis=0) / n_cols))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if GEMMA:  # the weight multiplies the fp32 normalised row
                dw += dy * x_normed
            else:
                dw += dy * x_normed.to(X.dtype.element_ty).to(tl.float32)
        dx_ptr += stride_dx
        dy_ptr += stride_dy
        x_ptr += stride_x

    if COMPUTE_DW:
        tl.store(DWPartial + program * n_cols + cols, dw, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    """Saves x and the per-row inverse RMS (4 bytes a row) instead of the normalised activations."""

    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2d.shape
        # What HF returns: `weight * x_normed` promotes (Llama); Gemma's `.type_as(x)` keeps x's dtype.
        out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        inv_rms = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = next_power_of_2(n_cols)
        _rms_norm_forward_kernel[(n_rows,)](
            y,
            x2d,
            weight,
            inv_rms,
            y.stride(0),
            x2d.stride(0),
            n_cols,
            eps,
            GEMMA=gemma,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
        ctx.save_for_backward(x2d, weight, inv_rms)
        ctx.shape = shape
        ctx.gemma = gemma
        return y.view(shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, inv_rms = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        dy = grad_y.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2d)
        compute_dw = ctx.needs_input_grad[1]
        programs = num_programs(x2d.device, n_rows)
        dw_partial = torch.empty((programs, n_cols) if compute_dw else (1, 1), dtype=torch.float32, device=x2d.device)
        block = next_power_of_2(n_cols)
        _rms_norm_backward_kernel[(programs,)](
            dx,
            dy,
            x2d,
            weight,
            inv_rms,
            dw_partial,
            dx.stride(0),
            dy.stride(0),
            x2d.stride(0),
            n_rows,
            n_cols,
            -(-n_rows // programs),
            COMPUTE_DW=compute_dw,
            GEMMA=ctx.gemma,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        return dx.view(ctx.shape), dw, None, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward, op for op (transformers 5.x)."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of x: Triton on CUDA (or under TRITON_INTERPRET=1), else PyTorch."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if x.numel() == 0 or not use_triton(x):
        return rms_norm_reference(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps, False)


def gemma_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face's GemmaRMSNorm / Gemma2RMSNorm / Gemma3RMSNorm.forward, op for op (transformers 5.x)."""
    output = x.float()
    output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + eps)
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gemma's RMSNorm, `(1 + weight) * x / rms(x)` in fp32 cast to x's dtype: Triton where `rms_norm` runs it."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if x.numel() == 0 or not use_triton(x):
        return gemma_rms_norm_reference(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps, True)
