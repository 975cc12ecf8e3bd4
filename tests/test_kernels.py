"""Parity of the Triton kernels and their PyTorch paths with eager PyTorch / Hugging Face modules.

Every kernel test runs twice: `torch` (CPU tensors, the PyTorch path) and `triton` (CUDA tensors on a
GPU machine; on CPU, Triton's interpreter). `triton.jit` and triton.language's own helpers pick
the interpreter once, when triton is imported, and other test files import triton (via
transformers) long before this one: so without CUDA the `triton` cases run in a child pytest
started with TRITON_INTERPRET=1 (test_interpreter_child_process_passes).
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cptflow.kernels import (
    apply_kernels,
    fused_linear_cross_entropy,
    geglu,
    geglu_reference,
    gemma_rms_norm,
    gemma_rms_norm_reference,
    linear_cross_entropy_reference,
    rms_norm,
    rms_norm_reference,
    swiglu,
    swiglu_gate_up,
    swiglu_gate_up_reference,
    swiglu_reference,
    use_triton,
)
from cptflow.kernels._dispatch import triton
from cptflow.kernels.fused_linear_cross_entropy import default_chunk_tokens

# The module, not the function that kernels/__init__.py re-exports under the same name.
fused_module = importlib.import_module("cptflow.kernels.fused_linear_cross_entropy")

FP32_TOL = 1e-5
# Triton's interpreter truncates fp32 -> bf16 casts (GPUs round to nearest): up to 1 bf16 ulp.
BF16_TOL = 1e-2


def _triton_runs_here() -> bool:
    if triton is None:
        return False
    if torch.cuda.is_available():
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return os.environ.get("TRITON_INTERPRET") == "1" and isinstance(triton.language.zeros, InterpretedFunction)


TRITON_HERE = _triton_runs_here()


# Without CUDA or the interpreter the `triton` cases are not collected here: the child runs them.
@pytest.fixture(params=["torch", "triton"] if TRITON_HERE else ["torch"])
def device(request, monkeypatch) -> str:
    """The device whose tensors take the requested path."""
    if request.param == "torch":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def ce_inputs(
    n=37, hidden=24, vocab=101, *, seed=0, ignored_every=4, dtype=torch.float32, weight_dtype=None, device="cpu"
):
    """Random hidden [n, hidden], head weight [vocab, hidden], labels with every k-th token ignored."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 3
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if ignored_every:
        labels[::ignored_every] = -100
    x = x.to(device, dtype).requires_grad_()
    w = w.to(device, weight_dtype or dtype).requires_grad_()
    return x, w, labels.to(device)


def reference_grads(x, w, labels, **kwargs):
    """Eager loss and grads in fp32 on CPU from the same (possibly bf16-rounded) inputs."""
    xr = x.detach().float().cpu().requires_grad_()
    wr = w.detach().float().cpu().requires_grad_()
    loss = linear_cross_entropy_reference(xr, wr, labels.cpu(), **kwargs)
    loss.backward()
    return loss, xr.grad, wr.grad


# --- fused linear + cross-entropy ------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_tokens", [None, 10, 1000])
def test_fused_ce_matches_eager_loss_and_grads(device, reduction, chunk_tokens):
    x, w, labels = ce_inputs(device=device)
    assert default_chunk_tokens(37, 101) == 16  # so None means chunks of 16, 16 and 5 tokens
    loss = fused_linear_cross_entropy(x, w, labels, reduction=reduction, chunk_tokens=chunk_tokens)
    loss.backward()
    ref_loss, ref_dx, ref_dw = reference_grads(x, w, labels, reduction=reduction)
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) <= FP32_TOL
    assert rel_err(x.grad, ref_dx) <= FP32_TOL
    assert rel_err(w.grad, ref_dw) <= FP32_TOL
    assert torch.all(x.grad[::4] == 0)  # ignored tokens get no gradient


def test_fused_ce_softcap_and_bias_match_eager(device):
    x, w, labels = ce_inputs(seed=1, device=device)
    bias = (0.5 * torch.randn(101, generator=torch.Generator().manual_seed(2))).to(device).requires_grad_()
    loss = fused_linear_cross_entropy(x, w, labels, softcap=2.5, bias=bias, chunk_tokens=6)
    loss.backward()
    xr, wr, br = (t.detach().cpu().requires_grad_() for t in (x, w, bias))
    ref = linear_cross_entropy_reference(xr, wr, labels.cpu(), softcap=2.5, bias=br)
    ref.backward()
    assert rel_err(loss, ref) <= FP32_TOL
    for ours, theirs in ((x.grad, xr.grad), (w.grad, wr.grad), (bias.grad, br.grad)):
        assert rel_err(ours, theirs) <= FP32_TOL


@pytest.mark.parametrize(
    "weight_dtype,accumulate_fp32", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)]
)
def test_fused_ce_bf16_within_tolerance_and_grads_in_input_dtype(device, weight_dtype, accumulate_fp32, monkeypatch):
    # 30-row vocabulary slices: the fp32 accumulation goes through its sliced bf16 temporary.
    monkeypatch.setattr(fused_module, "GRAD_WEIGHT_SLICE_BYTES", 30 * 24 * 2)
    x, w, labels = ce_inputs(seed=3, dtype=torch.bfloat16, weight_dtype=weight_dtype, device=device)
    loss = fused_linear_cross_entropy(x, w, labels, chunk_tokens=16, accumulate_fp32=accumulate_fp32)
    loss.backward()
    ref_loss, ref_dx, ref_dw = reference_grads(x, w.to(torch.bfloat16), labels)
    assert (x.grad.dtype, w.grad.dtype) == (torch.bfloat16, weight_dtype)
    assert rel_err(loss, ref_loss) <= BF16_TOL
    assert rel_err(x.grad, ref_dx) <= BF16_TOL
    assert rel_err(w.grad, ref_dw) <= BF16_TOL


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_ce_all_ignored_is_zero_loss_and_zero_grads(device, reduction):
    x, w, labels = ce_inputs(n=9, device=device)
    labels[:] = -100
    loss = fused_linear_cross_entropy(x, w, labels, reduction=reduction, chunk_tokens=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_fused_ce_frozen_input_gets_no_grad(device, trainable):
    x, w, labels = ce_inputs(seed=4, device=device)
    (w if trainable == "hidden" else x).requires_grad_(False)
    fused_linear_cross_entropy(x, w, labels, chunk_tokens=7).backward()
    _, ref_dx, ref_dw = reference_grads(x, w, labels)
    if trainable == "hidden":
        assert w.grad is None and rel_err(x.grad, ref_dx) <= FP32_TOL
    else:
        assert x.grad is None and rel_err(w.grad, ref_dw) <= FP32_TOL


def test_fused_ce_batched_hidden_and_scaled_grad_output(device):
    x, w, labels = ce_inputs(n=2 * 11, seed=5, device=device)
    x3 = x.detach().view(2, 11, -1).requires_grad_()
    loss = fused_linear_cross_entropy(x3, w, labels.view(2, 11), reduction="sum")
    (0.25 * loss).backward()  # the trainer's 1/valid-tokens-over-accumulation factor
    ref_loss, ref_dx, ref_dw = reference_grads(x, w, labels, reduction="sum")
    assert x3.grad.shape == (2, 11, 24)
    assert rel_err(loss, ref_loss) <= FP32_TOL
    assert rel_err(x3.grad.view(22, 24), 0.25 * ref_dx) <= FP32_TOL
    assert rel_err(w.grad, 0.25 * ref_dw) <= FP32_TOL


def test_fused_ce_under_no_grad_returns_the_loss(device):
    x, w, labels = ce_inputs(seed=6, device=device)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(x, w, labels)
    assert not loss.requires_grad
    assert rel_err(loss, reference_grads(x, w, labels)[0]) <= FP32_TOL


def test_default_chunk_is_a_quarter_of_the_tokens_within_a_1gib_logits_budget():
    assert default_chunk_tokens(4096, 128256, 4) == 1024  # 4 chunks of 501 MiB fp32 logits
    assert default_chunk_tokens(16384, 128256, 2) == 4096  # bf16: 4 chunks of 1002 MiB
    assert default_chunk_tokens(65536, 256000, 2) == 2048  # Gemma vocabulary: the budget decides
    assert default_chunk_tokens(5, 50, 4) == 2


# --- RMSNorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,weight_dtype,tol",
    [
        (torch.float32, torch.float32, FP32_TOL),
        (torch.bfloat16, torch.bfloat16, BF16_TOL),
        (torch.bfloat16, torch.float32, BF16_TOL),
    ],
)
def test_rms_norm_matches_hf_llama_rmsnorm(device, dtype, weight_dtype, tol):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(7)
    hf = LlamaRMSNorm(37, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(37, generator=gen))
    x = (2 * torch.randn(3, 7, 37, generator=gen)).to(dtype)
    grad_out = torch.randn(3, 7, 37, generator=gen)

    x_ref = x.clone().requires_grad_()
    y_ref = hf(x_ref)
    y_ref.backward(grad_out.to(y_ref.dtype))

    weight = hf.weight.detach().to(device).requires_grad_()
    x_ours = x.to(device).requires_grad_()
    y = rms_norm(x_ours, weight, eps=1e-5)
    y.backward(grad_out.to(device, y.dtype))
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= tol
    assert rel_err(x_ours.grad, x_ref.grad) <= tol
    assert rel_err(weight.grad, hf.weight.grad) <= tol


def test_rms_norm_reference_is_hf_llama_rmsnorm_exactly():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(24)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    assert torch.equal(rms_norm_reference(x, hf.weight, hf.variance_epsilon), hf(x))


def test_rms_norm_frozen_weight_gets_no_grad(device):
    x = torch.randn(6, 24, device=device, requires_grad=True)
    weight = torch.rand(24, device=device) + 0.5
    rms_norm(x, weight).sum().backward()
    x_ref = x.detach().cpu().requires_grad_()
    rms_norm_reference(x_ref, weight.cpu()).sum().backward()
    assert weight.grad is None
    assert rel_err(x.grad, x_ref.grad) <= FP32_TOL


@pytest.mark.parametrize(
    "dtype,weight_dtype,tol",
    [
        (torch.float32, torch.float32, FP32_TOL),
        (torch.bfloat16, torch.bfloat16, BF16_TOL),
        (torch.bfloat16, torch.float32, BF16_TOL),
    ],
)
def test_gemma_rms_norm_matches_hf_gemma2_rmsnorm(device, dtype, weight_dtype, tol):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    gen = torch.Generator().manual_seed(17)
    hf = Gemma2RMSNorm(37, eps=1e-6).to(weight_dtype)
    with torch.no_grad():  # Gemma's weight is an offset from 1 (it starts at 0)
        hf.weight.copy_(0.3 * torch.randn(37, generator=gen))
    x = (2 * torch.randn(3, 7, 37, generator=gen)).to(dtype)
    grad_out = torch.randn(3, 7, 37, generator=gen)

    x_ref = x.clone().requires_grad_()
    y_ref = hf(x_ref)
    y_ref.backward(grad_out.to(y_ref.dtype))

    weight = hf.weight.detach().to(device).requires_grad_()
    x_ours = x.to(device).requires_grad_()
    y = gemma_rms_norm(x_ours, weight, eps=1e-6)
    y.backward(grad_out.to(device, y.dtype))
    assert y.dtype == y_ref.dtype == dtype and y.shape == y_ref.shape  # x's dtype, whatever the weight's
    assert rel_err(y, y_ref) <= tol
    assert rel_err(x_ours.grad, x_ref.grad) <= tol
    assert weight.grad.dtype == weight_dtype
    assert rel_err(weight.grad, hf.weight.grad) <= tol


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_gemma_rms_norm_reference_is_hf_gemma_rmsnorm_exactly(family):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    hf = getattr(module, f"{family.capitalize()}RMSNorm")(24)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    assert torch.equal(gemma_rms_norm_reference(x, hf.weight, hf.eps), hf(x))


def test_gemma_rms_norm_frozen_weight_gets_no_grad(device):
    x = torch.randn(6, 24, device=device, requires_grad=True)
    weight = torch.randn(24, device=device)
    gemma_rms_norm(x, weight).sum().backward()
    x_ref = x.detach().cpu().requires_grad_()
    gemma_rms_norm_reference(x_ref, weight.cpu()).sum().backward()
    assert weight.grad is None
    assert rel_err(x.grad, x_ref.grad) <= FP32_TOL


# --- SwiGLU -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_swiglu_matches_silu_times_up(device, dtype, tol):
    gen = torch.Generator().manual_seed(8)
    gate, up, grad_out = (3 * torch.randn(3, 5, 139, generator=gen) for _ in range(3))  # 2085: 3 blocks
    gate_ref, up_ref = gate.to(dtype).clone().requires_grad_(), up.to(dtype).clone().requires_grad_()
    out_ref = F.silu(gate_ref) * up_ref
    out_ref.backward(grad_out.to(dtype))

    gate_ours = gate.to(device, dtype).requires_grad_()
    up_ours = up.to(device, dtype).requires_grad_()
    out = swiglu(gate_ours, up_ours)
    out.backward(grad_out.to(device, dtype))
    assert out.dtype == dtype
    assert rel_err(out, out_ref) <= tol
    assert rel_err(gate_ours.grad, gate_ref.grad) <= tol
    assert rel_err(up_ours.grad, up_ref.grad) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("row_padding", [0, 6])
def test_swiglu_gate_up_matches_phi3_mlp_activation(device, dtype, tol, row_padding):
    gen = torch.Generator().manual_seed(19)
    # Intermediate 1100: two column blocks a row, the second partial. row_padding: rows further
    # apart than 2 * intermediate (a view of a wider buffer), read through the row stride.
    buffer = 3 * torch.randn(3, 4, 2 * 1100 + row_padding, generator=gen)
    grad_out = torch.randn(3, 4, 1100, generator=gen)
    gate_up_ref = buffer[..., :2200].to(dtype).clone().requires_grad_()
    gate, up = gate_up_ref.chunk(2, dim=-1)
    out_ref = up * F.silu(gate)  # Phi3MLP.forward's op order
    out_ref.backward(grad_out.to(dtype))
    assert torch.equal(swiglu_gate_up_reference(gate_up_ref), out_ref)

    buffer_ours = buffer.to(device, dtype).requires_grad_()
    gate_up = buffer_ours[..., :2200]
    out = swiglu_gate_up(gate_up)
    out.backward(grad_out.to(device, dtype))
    assert out.dtype == dtype and out.shape == (3, 4, 1100)
    assert rel_err(out, out_ref) <= tol
    assert rel_err(buffer_ours.grad[..., :2200], gate_up_ref.grad) <= tol
    assert torch.count_nonzero(buffer_ours.grad[..., 2200:]) == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_geglu_matches_gelu_tanh_times_up(device, dtype, tol):
    from transformers.activations import ACT2FN

    gen = torch.Generator().manual_seed(18)
    gate, up, grad_out = (3 * torch.randn(3, 5, 139, generator=gen) for _ in range(3))  # 2085: 3 blocks
    gate_ref, up_ref = gate.to(dtype).clone().requires_grad_(), up.to(dtype).clone().requires_grad_()
    out_ref = F.gelu(gate_ref, approximate="tanh") * up_ref
    out_ref.backward(grad_out.to(dtype))
    assert torch.equal(geglu_reference(gate_ref, up_ref), ACT2FN["gelu_pytorch_tanh"](gate_ref) * up_ref)

    gate_ours = gate.to(device, dtype).requires_grad_()
    up_ours = up.to(device, dtype).requires_grad_()
    out = geglu(gate_ours, up_ours)
    out.backward(grad_out.to(device, dtype))
    assert out.dtype == dtype
    assert rel_err(out, out_ref) <= tol
    assert rel_err(gate_ours.grad, gate_ref.grad) <= tol
    assert rel_err(up_ours.grad, up_ref.grad) <= tol


def test_dispatch_sends_cpu_tensors_to_pytorch_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(torch.zeros(1))
    assert swiglu(torch.ones(2), torch.ones(2)).grad_fn is None  # plain eager ops, no Function
    x = torch.ones(2, 3, requires_grad=True)
    assert type(rms_norm(x, torch.ones(3)).grad_fn).__name__ == "MulBackward0"
    assert swiglu_reference(torch.zeros(2), torch.ones(2)).sum() == 0
    assert geglu(torch.ones(2), torch.ones(2)).grad_fn is None
    assert type(swiglu_gate_up(torch.ones(2, 4, requires_grad=True)).grad_fn).__name__ == "MulBackward0"
    assert gemma_rms_norm(torch.ones(2, 3), torch.zeros(3)).grad_fn is None


# --- patch.py: kernels inside real (tiny) Hugging Face models ----------------------------------

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,
)


# family: (config class, model class, config fields the family needs at this size; cf. tests/families.py)
TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    # Soft-capped logits and attention scores, as the real Gemma 2 has.
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16},
    ),
    # Multimodal: text fields go into text_config (tiny_model); a 1-layer SigLIP tower beside it.
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", {}),
}
TINY_SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)


def tiny_model(family: str, **overrides):
    import transformers

    config_name, model_name, fields = TINY_FAMILIES[family]
    if family == "gemma3":
        text_config = {**TINY, **TINY_FAMILIES["gemma3_text"][2], **overrides}
        # Image token ids past the text vocabulary: the random text ids never hit them.
        config = transformers.Gemma3Config(
            text_config=text_config,
            vision_config={**TINY_SIGLIP, "patch_size": 14},
            mm_tokens_per_image=4,
            image_token_index=200,
            boi_token_index=201,
            eoi_token_index=202,
        )
    else:
        config = getattr(transformers, config_name)(**{**TINY, **fields, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # norms start at 1.0 (Gemma: at 1 + 0): make their weight gradients non-trivial
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                if family.startswith("gemma"):
                    module.weight.add_(0.2 * torch.randn_like(module.weight))
                else:
                    module.weight.mul_(1 + 0.2 * torch.randn_like(module.weight))
    return model


def logits_and_grads(model, device):
    model = model.to(device)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(9)).to(device)
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, 101).float(), ids[:, 1:].reshape(-1)).backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().cpu(), grads


# RMSNorms in the 2-layer models: Llama-like 2 a layer + final; Qwen3 adds q_norm/k_norm, Gemma 2
# has 4 a layer, Gemma 3 4 plus q_norm/k_norm (multimodal: plus the projector's mm_soft_emb_norm).
NORMS = {"qwen3": 9, "gemma2": 9, "gemma3_text": 13, "gemma3": 14}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_apply_kernels_keeps_logits_and_grads(device, family):
    eager = tiny_model(family)
    patched = copy.deepcopy(eager)
    report = apply_kernels(patched, rms_norm="on", swiglu="on")
    assert report == {
        "family": family,
        "rms_norm": {"mode": "on", "patched": NORMS.get(family, 5)},
        "swiglu": {"mode": "on", "patched": 2},
    }
    patched_classes = {type(m).__name__ for m in patched.modules() if "forward" in vars(m)}
    every_norm_and_mlp = {
        type(m).__name__
        for m in eager.modules()
        if type(m).__name__.endswith(("RMSNorm", "MLP")) and not type(m).__name__.startswith("Siglip")
    }  # SigLIP (Gemma 3's vision tower): LayerNorm and a plain GELU MLP, no gated kernel applies
    assert patched_classes == every_norm_and_mlp and len(patched_classes) == 2
    logits_ref, grads_ref = logits_and_grads(eager, "cpu")
    logits, grads = logits_and_grads(patched, device)
    assert rel_err(logits, logits_ref) <= FP32_TOL
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) <= FP32_TOL, name


@pytest.mark.parametrize(
    "family,targets",
    [("llama", ["gate_proj", "up_proj", "down_proj"]), ("phi3", ["gate_up_proj", "down_proj"])],
)
def test_apply_kernels_on_lora_wrapped_mlp_keeps_lora_grads(device, family, targets):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        lora_dropout=0.0,
        init_lora_weights=False,
    )  # non-zero B: the adapters take part in the forward
    eager = get_peft_model(tiny_model(family), lora)
    patched = copy.deepcopy(eager)
    assert apply_kernels(patched)["swiglu"]["patched"] == 2
    logits_ref, grads_ref = logits_and_grads(eager, "cpu")
    logits, grads = logits_and_grads(patched, device)
    assert rel_err(logits, logits_ref) <= FP32_TOL
    assert grads.keys() == grads_ref.keys() and any("lora_A" in name for name in grads)
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) <= FP32_TOL, name


def test_apply_kernels_off_leaves_module_forwards_untouched():
    model = tiny_model("llama")
    report = apply_kernels(model, rms_norm="off", swiglu="off")
    assert report["rms_norm"]["patched"] == 0 and report["swiglu"]["patched"] == 0
    assert not any("forward" in vars(module) for module in model.modules())
    apply_kernels(model, rms_norm="auto", swiglu="off")
    patched = {type(m).__name__ for m in model.modules() if "forward" in vars(m)}
    assert patched == {"LlamaRMSNorm"}


def test_apply_kernels_skips_swiglu_when_the_mlp_is_not_silu():
    model = tiny_model("llama", hidden_act="gelu")
    report = apply_kernels(model)
    assert report["rms_norm"]["patched"] == 5
    assert report["swiglu"]["patched"] == 0 and "gelu" in report["swiglu"]["reason"]
    with pytest.raises(ValueError, match="gelu"):
        apply_kernels(tiny_model("llama", hidden_act="gelu"), swiglu="on")


@pytest.mark.parametrize(
    "family,field,value",
    [
        ("phi3", "hidden_act", "gelu"),
        ("gemma2", "hidden_activation", "gelu"),
        ("gemma3_text", "hidden_activation", "silu"),
    ],
)
def test_apply_kernels_skips_the_mlp_whose_activation_the_kernel_does_not_compute(family, field, value):
    report = apply_kernels(tiny_model(family, **{field: value}))
    assert report["rms_norm"]["patched"] == NORMS.get(family, 5)
    assert report["swiglu"]["patched"] == 0
    assert field in report["swiglu"]["reason"] and repr(value) in report["swiglu"]["reason"]
    with pytest.raises(ValueError, match=field):
        apply_kernels(tiny_model(family, **{field: value}), swiglu="on")


def test_apply_kernels_unsupported_family_raises_on_and_reports_on_auto():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=101, n_positions=16))
    with pytest.raises(ValueError, match="gpt2"):
        apply_kernels(model, rms_norm="on")
    report = apply_kernels(model)
    assert report["rms_norm"]["patched"] == 0 and "gpt2" in report["rms_norm"]["reason"]
    assert not any("forward" in vars(module) for module in model.modules())


# --- GPU code generation, checked on any machine ------------------------------------------------


def test_kernels_compile_to_h100_machine_code(tmp_path, monkeypatch):
    """The interpreter runs Python, not Triton's compiler: compile every kernel for sm_90 (no GPU needed)."""
    if triton is None:
        pytest.skip("triton not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from cptflow.kernels.geglu import _geglu_backward_kernel, _geglu_forward_kernel
    from cptflow.kernels.rms_norm import _rms_norm_backward_kernel, _rms_norm_forward_kernel
    from cptflow.kernels.swiglu import (
        _swiglu_backward_kernel,
        _swiglu_forward_kernel,
        _swiglu_gate_up_backward_kernel,
        _swiglu_gate_up_forward_kernel,
    )

    if not isinstance(_swiglu_forward_kernel, JITFunction):
        pytest.skip("this process imported triton in interpreter mode")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile, do not reuse a cache
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; silences Triton 3.9's notice
    kernels_and_signatures = [
        (
            fused_module._cross_entropy_rows_kernel,
            {
                "Logits": "*bf16",
                "stride_row": "i64",
                "Labels": "*i64",
                "RowLoss": "*fp32",
                "Scale": "*fp32",
                "V": "i32",
                "ignore_index": "i32",
                "softcap": "fp32",
            },
            {"HAS_SOFTCAP": True, "COMPUTE_GRAD": True, "BLOCK_V": 32768},
            32,
        ),
        (
            _rms_norm_forward_kernel,
            {
                "Y": "*bf16",
                "X": "*bf16",
                "W": "*bf16",
                "InvRms": "*fp32",
                "stride_y": "i32",
                "stride_x": "i32",
                "n_cols": "i32",
                "eps": "fp32",
            },
            {"GEMMA": False, "BLOCK": 4096},
            8,
        ),
        (
            _rms_norm_backward_kernel,
            {
                "DX": "*bf16",
                "DY": "*bf16",
                "X": "*bf16",
                "W": "*bf16",
                "InvRms": "*fp32",
                "DWPartial": "*fp32",
                "stride_dx": "i32",
                "stride_dy": "i32",
                "stride_x": "i32",
                "n_rows": "i32",
                "n_cols": "i32",
                "rows_per_program": "i32",
            },
            {"COMPUTE_DW": True, "GEMMA": False, "BLOCK": 4096},
            8,
        ),
        (
            _swiglu_forward_kernel,
            {"Out": "*bf16", "Gate": "*bf16", "Up": "*bf16", "n_elements": "i32"},
            {"BLOCK": 1024},
            4,
        ),
        (
            _swiglu_backward_kernel,
            {"DGate": "*bf16", "DUp": "*bf16", "DOut": "*bf16", "Gate": "*bf16", "Up": "*bf16", "n_elements": "i32"},
            {"BLOCK": 1024},
            4,
        ),
    ]
    # Gemma's RMSNorm variant and the GeGLU kernels: same signatures as their Llama/SwiGLU siblings.
    gemma_norms = [(k, sig, {**c, "GEMMA": True}, w) for k, sig, c, w in kernels_and_signatures[1:3]]
    geglus = [
        (g, sig, c, w)
        for g, (_, sig, c, w) in zip((_geglu_forward_kernel, _geglu_backward_kernel), kernels_and_signatures[3:5])
    ]
    gate_up = [
        (
            _swiglu_gate_up_forward_kernel,
            {"Out": "*bf16", "GateUp": "*bf16", "stride_in": "i64", "n_cols": "i32"},
            {"BLOCK": 1024},
            4,
        ),
        (
            _swiglu_gate_up_backward_kernel,
            {"DGateUp": "*bf16", "DOut": "*bf16", "GateUp": "*bf16", "stride_in": "i64", "n_cols": "i32"},
            {"BLOCK": 1024},
            4,
        ),
    ]
    kernels_and_signatures += gemma_norms + geglus + gate_up
    for kernel, signature, constexprs, num_warps in kernels_and_signatures:
        source = ASTSource(kernel, {**signature, **{name: "constexpr" for name in constexprs}}, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert compiled.asm.get("cubin"), kernel.__name__


# --- the interpreter run ------------------------------------------------------------------------


@pytest.mark.skipif(TRITON_HERE or triton is None, reason="the triton cases already ran in this process")
def test_interpreter_child_process_passes():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-P",  # not the checkout on sys.path: its kernels/ would shadow Hugging Face's `kernels`
            "-m",
            "pytest",
            "-q",
            "--noconftest",
            "-p",
            "no:cacheprovider",
            "-k",
            "triton",
            "-W",
            "ignore::DeprecationWarning",
            __file__,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary, summary
