"""Fused lm_head + cross-entropy over token chunks: the full [tokens, vocab] logits never exist.

Called by the CPT trainer in place of `lm_head(hidden)` + `F.cross_entropy`; Triton does the row loss/grad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cptflow.kernels._dispatch import next_power_of_2, num_warps_for, triton_jit, use_triton

try:
    import triton.language as tl
except ImportError:
    tl = None

# Liger's MAX_FUSED_SIZE: one program walks the vocabulary in blocks of at most this many logits.
MAX_BLOCK_V = 32768
# Default chunking: at least MIN_CHUNKS chunks (eager holds ~3 fp32 copies of the logits, so a
# quarter of them in bf16 is already small beside it), each chunk's logits under
# LOGITS_CHUNK_BYTES. Few chunks matter for speed: every chunk re-reads and re-writes the whole
# [vocab, hidden] weight gradient, which at vocab 128k costs about as much as the chunk's GEMMs.
MIN_CHUNKS = 4
LOGITS_CHUNK_BYTES = 1 << 30
# Cap on the bf16 temporary that carries a chunk's weight gradient into the fp32 accumulator.
GRAD_WEIGHT_SLICE_BYTES = 256 << 20


@triton_jit
def _cross_entropy_rows_kernel(
    Logits,
    stride_row,
    Labels,
    RowLoss,
    Scale,
    V,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per token row: loss = logsumexp(z) - z[label]; z's gradient written over z."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = Logits + row * stride_row
    label = tl.load(Labels + row)

    if label == ignore_index:
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + cols, 0.0, mask=cols < V)
        tl.store(RowLoss + row, 0.0)
        return

    # Pass 1: online softmax (Milakov & Gimelshein 2018) so a row never has to fit in registers.
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            # tanh via exp: libdevice's tanh is CUDA-only and the interpreter must run this too.
            z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
            z = tl.where(mask, z, float("-inf"))  # capping maps the padding's -inf to -softcap
        block_max = tl.max(z, axis=0)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    z_label = tl.load(row_ptr + label).to(tl.float32)
    if HAS_SOFTCAP:
        z_label = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z_label / softcap) + 1.0))
    tl.store(RowLoss + row, lse - z_label)

    # Pass 2: d loss / d z = softmax - onehot, scaled (1/valid tokens for "mean"), in place.
    if COMPUTE_GRAD:
        scale = tl.load(Scale)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                capped_tanh = 1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0)
                z = softcap * capped_tanh
            grad = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - capped_tanh * capped_tanh)
            tl.store(row_ptr + cols, (grad * scale).to(Logits.dtype.element_ty), mask=mask)


def _rows_loss_and_grad_triton(logits, labels, row_loss, scale, ignore_index, softcap, compute_grad):
    n_rows, vocab = logits.shape
    block_v = min(MAX_BLOCK_V, next_power_of_2(vocab))
    _cross_entropy_rows_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        labels,
        row_loss,
        scale,
        vocab,
        ignore_index,
        float(softcap or 0.0),
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        num_warps=num_warps_for(block_v),
    )


def _rows_loss_and_grad_torch(logits, labels, row_loss, scale, ignore_index, softcap, compute_grad):
    """PyTorch twin of the Triton kernel: same outputs, same in-place gradient over `logits`."""
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
    z = logits.float()  # a view when logits are fp32: the in-place steps below then reuse the chunk
    if softcap is not None:
        capped_tanh = z.div(softcap).tanh_()
        z = capped_tanh * softcap
    z_label = z.gather(1, safe_labels).squeeze(1)
    # logsumexp by hand, in place: torch.logsumexp would allocate another chunk-sized tensor.
    row_max = z.amax(dim=1, keepdim=True)
    exp_z = z.sub_(row_max).exp_()
    sum_exp = exp_z.sum(dim=1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    row_loss.copy_((lse - z_label).masked_fill_(~valid, 0.0))
    if compute_grad:
        grad = exp_z.div_(sum_exp)
        grad.scatter_add_(1, safe_labels, torch.full_like(safe_labels, -1.0, dtype=grad.dtype))
        if softcap is not None:
            grad.mul_(capped_tanh.mul_(capped_tanh).neg_().add_(1.0))
        grad.mul_((valid.to(grad.dtype) * scale).unsqueeze(1))
        if grad.data_ptr() != logits.data_ptr():
            logits.copy_(grad)


def default_chunk_tokens(n_tokens: int, vocab: int, element_size: int = 4) -> int:
    """Tokens per chunk (a power of 2): at least MIN_CHUNKS chunks, logits under LOGITS_CHUNK_BYTES."""
    by_count = next_power_of_2(-(-n_tokens // MIN_CHUNKS))
    by_budget = max(1, LOGITS_CHUNK_BYTES // (vocab * element_size))
    return min(by_count, 1 << (by_budget.bit_length() - 1))


def _fused_forward(
    hidden,
    weight,
    bias,
    labels,
    *,
    ignore_index,
    reduction,
    chunk_tokens,
    softcap,
    accumulate_fp32,
    grad_hidden_needed,
    grad_weight_needed,
    grad_bias_needed,
    rows_fn,
):
    """Loss plus every gradient (for grad_output = 1), chunk by chunk over the tokens."""
    x = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(torch.int64)  # gather wants int64; int32 labels are common too
    n_tokens, n_hidden = x.shape
    vocab = weight.shape[0]
    compute_dtype = x.dtype
    # Like autocast: the matmuls run in the activations' dtype (an fp32 head meets bf16 hiddens).
    w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)

    n_valid = (y != ignore_index).sum()
    if reduction == "mean":
        scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
    else:
        scale = torch.ones((), dtype=torch.float32, device=x.device)
    scale = scale.reshape(1)

    compute_grad = grad_hidden_needed or grad_weight_needed or grad_bias_needed
    grad_hidden = torch.empty_like(x) if grad_hidden_needed else None
    # fp32 accumulator: a bf16 running sum is rounded once per chunk. The price is memory: 4 bytes
    # per weight element while the loss runs, plus the bf16 copy returned (see docs/kernels.md).
    accumulate_dtype = torch.float32 if accumulate_fp32 else weight.dtype
    grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=x.device) if grad_weight_needed else None
    vocab_slice = max(1, GRAD_WEIGHT_SLICE_BYTES // (n_hidden * x.element_size()))
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=x.device) if grad_bias_needed else None
    row_loss = torch.empty(n_tokens, dtype=torch.float32, device=x.device)

    chunk = chunk_tokens or default_chunk_tokens(n_tokens, vocab, x.element_size())
    logits_buffer = torch.empty(min(chunk, n_tokens), vocab, dtype=compute_dtype, device=x.device)
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        x_chunk = x[start:end]
        logits = logits_buffer[: end - start]
        if b is None:
            torch.mm(x_chunk, w.t(), out=logits)
        else:
            torch.addmm(b, x_chunk, w.t(), out=logits)
        rows_fn(logits, y[start:end], row_loss[start:end], scale, ignore_index, softcap, compute_grad)
        # `logits` now holds d loss / d logits for this chunk.
        if grad_hidden is not None:
            torch.mm(logits, w, out=grad_hidden[start:end])
        if grad_weight is not None:
            if grad_weight.dtype == compute_dtype:
                grad_weight.addmm_(logits.t(), x_chunk)  # accumulated inside the GEMM, no temporary
            else:
                # No torch GEMM adds bf16 products into an fp32 output: go through a bf16
                # temporary, a vocabulary slice at a time so it stays small.
                for v0 in range(0, vocab, vocab_slice):
                    grad_weight[v0 : v0 + vocab_slice].add_(logits[:, v0 : v0 + vocab_slice].t() @ x_chunk)
        if grad_bias is not None:
            grad_bias.add_(logits.sum(0, dtype=torch.float32))

    loss = row_loss.sum() * scale[0]
    return (
        loss,
        None if grad_hidden is None else grad_hidden.view(hidden.shape),
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Gradients are computed in forward (the chunk's logits are gone by backward); backward scales."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        reduction,
        chunk_tokens,
        softcap,
        accumulate_fp32,
        triton_rows,
        grad_mode,
    ):
        loss, grad_hidden, grad_weight, grad_bias = _fused_forward(
            hidden,
            weight,
            bias,
            labels,
            ignore_index=ignore_index,
            reduction=reduction,
            chunk_tokens=chunk_tokens,
            softcap=softcap,
            accumulate_fp32=accumulate_fp32,
            grad_hidden_needed=grad_mode and ctx.needs_input_grad[0],
            grad_weight_needed=grad_mode and ctx.needs_input_grad[1],
            grad_bias_needed=grad_mode and bias is not None and ctx.needs_input_grad[2],
            rows_fn=_rows_loss_and_grad_triton if triton_rows else _rows_loss_and_grad_torch,
        )
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads = list(ctx.saved_tensors)
        # The usual grad_output is exactly 1: skip a copy of a [vocab, hidden] gradient then.
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None


def linear_cross_entropy_reference(
    hidden, weight, labels, *, ignore_index=-100, reduction="mean", softcap=None, bias=None
) -> torch.Tensor:
    """Eager F.linear + F.cross_entropy on the full logits: what the fused loss must equal."""
    logits = F.linear(
        hidden.reshape(-1, hidden.shape[-1]), weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
    ).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    accumulate_fp32: bool = True,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against already shifted `labels`, as an fp32 scalar.

    hidden [..., H], weight [V, H], labels [...] (position i predicts labels[i]). "sum" adds the
    token losses of non-ignored tokens (the trainer divides across gradient-accumulation steps);
    "mean" divides by their count here, and is 0.0 when every token is ignored.
    chunk_tokens: tokens per chunk (default `default_chunk_tokens`). accumulate_fp32=False sums a
    bf16 weight's gradient in bf16 inside the GEMM (Liger's default): 2 bytes less per weight
    element and less memory traffic, one extra rounding per chunk.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} minus its last dim")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [vocab, {hidden.shape[-1]}]")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if labels.numel() == 0:
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float()
    # ctx.needs_input_grad stays True under torch.no_grad() and forward always runs with grad
    # disabled: read the grad mode here, so evaluation skips the gradient work.
    return FusedLinearCrossEntropyFunction.apply(
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        reduction,
        chunk_tokens,
        softcap,
        accumulate_fp32,
        use_triton(hidden),
        torch.is_grad_enabled(),
    )
