"""Route a loaded Hugging Face model's RMSNorm and gated MLP modules through `kernels/`.

Called by the training stages after loading (and LoRA-wrapping) the model; per instance, no library edits.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

from torch import nn

from cptflow.kernels.geglu import geglu as fused_geglu
from cptflow.kernels.rms_norm import gemma_rms_norm as fused_gemma_rms_norm
from cptflow.kernels.rms_norm import rms_norm as fused_rms_norm
from cptflow.kernels.swiglu import swiglu as fused_swiglu
from cptflow.kernels.swiglu import swiglu_gate_up as fused_swiglu_gate_up

SILU_ACTIVATIONS = ("silu", "swish")
GELU_TANH_ACTIVATIONS = ("gelu_pytorch_tanh",)
MODES = ("auto", "on", "off")


def _rms_norm_forward(self, hidden_states):
    return fused_rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _gemma_rms_norm_forward(self, x):
    return fused_gemma_rms_norm(x, self.weight, self.eps)


# Only the submodules are called, so LoRA-wrapped or 4-bit projections keep working.
def _swiglu_mlp_forward(self, x):
    return self.down_proj(fused_swiglu(self.gate_proj(x), self.up_proj(x)))


def _fused_gate_up_swiglu_mlp_forward(self, hidden_states):
    # Phi-3: one projection gives [gate | up]; the kernel reads the halves in place and writes one gradient.
    return self.down_proj(fused_swiglu_gate_up(self.gate_up_proj(hidden_states)))


def _geglu_mlp_forward(self, x):
    return self.down_proj(fused_geglu(self.gate_proj(x), self.up_proj(x)))


@dataclass(frozen=True)
class FamilyKernels:
    """Which module classes of a family get which forward, and which activation the MLP kernel assumes."""

    norm_class: str
    norm_forward: types.FunctionType
    mlp_class: str
    mlp_forward: types.FunctionType
    activation_attr: str  # the config field the MLP's activation comes from
    activations: tuple[str, ...]  # values of it the MLP kernel computes


def _llama_like(prefix: str) -> FamilyKernels:
    """RMSNorm exactly `weight * (x * rsqrt(mean(x^2) + eps)).to(input_dtype)`, MLP `down(silu(gate(x)) * up(x))`."""
    return FamilyKernels(
        f"{prefix}RMSNorm", _rms_norm_forward, f"{prefix}MLP", _swiglu_mlp_forward, "hidden_act", SILU_ACTIVATIONS
    )


def _gemma(prefix: str, activation_attr: str) -> FamilyKernels:
    """RMSNorm `(x * rsqrt(mean(x^2) + eps) * (1 + weight)).type_as(x)` in fp32; MLP `down(gelu_tanh(gate) * up)`."""
    return FamilyKernels(
        f"{prefix}RMSNorm",
        _gemma_rms_norm_forward,
        f"{prefix}MLP",
        _geglu_mlp_forward,
        activation_attr,
        GELU_TANH_ACTIVATIONS,
    )


# Keyed by `config.model_type` (transformers 5.x module code checked for each). Absent on purpose:
# Phi-1/2 ("phi": LayerNorm and a plain GELU MLP), GPT-2 and other LayerNorm families, Gemma 3n
# (its MLP sparsifies activations), and everything not checked yet.
FAMILIES = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3"),
    # Phi3RMSNorm is Llama's formula; Phi3MLP fuses gate and up into one gate_up_proj.
    "phi3": FamilyKernels(
        "Phi3RMSNorm", _rms_norm_forward, "Phi3MLP", _fused_gate_up_swiglu_mlp_forward, "hidden_act", SILU_ACTIVATIONS
    ),
    "gemma": _gemma("Gemma", "hidden_act"),
    "gemma2": _gemma("Gemma2", "hidden_activation"),
    "gemma3_text": _gemma("Gemma3", "hidden_activation"),
    # Gemma3ForConditionalGeneration: the text model's modules (and the projector's Gemma3RMSNorm);
    # the SigLIP vision tower has LayerNorm and an ungated MLP, left alone.
    "gemma3": _gemma("Gemma3", "hidden_activation"),
}
# (RMSNorm class, MLP class) per family: what `kernels_for_family` answers.
FAMILY_MODULES = {name: (family.norm_class, family.mlp_class) for name, family in FAMILIES.items()}


def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):  # a PeftModel
        config = getattr(model.get_base_model(), "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `config`: not a Hugging Face model")
    return config


def kernels_for_family(model_type: str) -> tuple[str, str] | None:
    """(RMSNorm class name, MLP class name) for a supported `config.model_type`, else None."""
    return FAMILY_MODULES.get(model_type)


def apply_kernels(model: nn.Module, rms_norm: str = "auto", swiglu: str = "auto") -> dict:
    """Replace the `forward` of each RMSNorm and gated MLP instance in `model`; report what changed.

    `swiglu` switches the family's gated-MLP kernel: SwiGLU for Llama/Mistral/Qwen/Phi-3, GeGLU-tanh
    for Gemma. "auto": patch where the model family (and, for the MLP, the activation the kernel
    computes) supports it, else report why not. "on": the same, but raise ValueError where it does
    not apply. "off": leave those modules untouched. Kernels dispatch per tensor, so a patched model
    still runs on CPU.
    """
    modes = {"rms_norm": rms_norm, "swiglu": swiglu}
    for name, mode in modes.items():
        if mode not in MODES:
            raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    config = _model_config(model)
    model_type = getattr(config, "model_type", None) or "unknown"
    report = {"family": model_type, **{name: {"mode": mode, "patched": 0} for name, mode in modes.items()}}

    def skip(name: str, reason: str) -> None:
        if modes[name] == "on":
            raise ValueError(f"{name}='on' but {reason}")
        report[name]["reason"] = reason
        modes[name] = "off"

    family = FAMILIES.get(model_type)
    if family is None:
        for name in modes:
            if modes[name] != "off":
                skip(name, f"model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})")
        return report
    # Multimodal configs (Gemma 3) keep the language model's activation in their text config.
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    activation = getattr(text_config, family.activation_attr, None)
    if modes["swiglu"] != "off" and activation not in family.activations:
        kernel = "SiLU" if family.activations == SILU_ACTIVATIONS else "gelu_pytorch_tanh"
        skip("swiglu", f"{model_type} {family.activation_attr} is {activation!r}, not {kernel}")

    targets = {
        "rms_norm": (family.norm_class, family.norm_forward),
        "swiglu": (family.mlp_class, family.mlp_forward),
    }
    for module in model.modules():
        for name, (class_name, forward) in targets.items():
            if modes[name] != "off" and type(module).__name__ == class_name:
                module.forward = types.MethodType(forward, module)
                report[name]["patched"] += 1
    for name, (class_name, _) in targets.items():
        if modes[name] != "off" and report[name]["patched"] == 0:
            skip(name, f"no {class_name} module found")
    return report
