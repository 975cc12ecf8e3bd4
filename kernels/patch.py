"""Route a loaded Hugging Face model's RMSNorm and SwiGLU MLP modules through `kernels/`.

Called by the training stages after loading (and LoRA-wrapping) the model; per instance, no library edits.
"""

from __future__ import annotations

import types

from torch import nn

from cptflow.kernels.rms_norm import rms_norm as fused_rms_norm
from cptflow.kernels.swiglu import swiglu as fused_swiglu

# Families whose RMSNorm is exactly `weight * (x * rsqrt(mean(x^2) + eps)).to(input_dtype)` and
# whose MLP is `down(act(gate(x)) * up(x))`. Gemma is absent on purpose: its norm scales by
# (1 + weight) and casts after the multiply.
FAMILY_MODULES = {
    "llama": ("LlamaRMSNorm", "LlamaMLP"),
    "mistral": ("MistralRMSNorm", "MistralMLP"),
    "qwen2": ("Qwen2RMSNorm", "Qwen2MLP"),
    "qwen3": ("Qwen3RMSNorm", "Qwen3MLP"),
}
SILU_ACTIVATIONS = ("silu", "swish")
MODES = ("auto", "on", "off")


def _rms_norm_forward(self, hidden_states):
    return fused_rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self, x):
    # Only the submodules are called, so LoRA-wrapped or 4-bit projections keep working.
    return self.down_proj(fused_swiglu(self.gate_proj(x), self.up_proj(x)))


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
    """Replace the `forward` of each RMSNorm and SwiGLU MLP instance in `model`; report what changed.

    "auto": patch where the model family (and, for the MLP, a SiLU activation) supports it, else
    report why not. "on": the same, but raise ValueError where it does not apply. "off": leave
    those modules untouched. Kernels dispatch per tensor, so a patched model still runs on CPU.
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

    family = kernels_for_family(model_type)
    for name in modes:
        if modes[name] != "off" and family is None:
            skip(name, f"model_type {model_type!r} is not supported (supported: {sorted(FAMILY_MODULES)})")
    hidden_act = getattr(config, "hidden_act", None)
    if modes["swiglu"] != "off" and hidden_act not in SILU_ACTIVATIONS:
        skip("swiglu", f"{model_type} hidden_act is {hidden_act!r}, not SiLU")
    if family is None:
        return report

    targets = {"rms_norm": (family[0], _rms_norm_forward), "swiglu": (family[1], _swiglu_mlp_forward)}
    for module in model.modules():
        for name, (class_name, forward) in targets.items():
            if modes[name] != "off" and type(module).__name__ == class_name:
                module.forward = types.MethodType(forward, module)
                report[name]["patched"] += 1
    for name, (class_name, _) in targets.items():
        if modes[name] != "off" and report[name]["patched"] == 0:
            skip(name, f"no {class_name} module found")
    return report
