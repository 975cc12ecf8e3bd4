"""Triton kernels for training, each beside its PyTorch reference: fused lm_head + loss, RMSNorm, SwiGLU, GeGLU.

Used by the cpt/sft training stages; CUDA tensors run Triton, CPU tensors the PyTorch path (see _dispatch).
"""

from cptflow.kernels._dispatch import use_triton
from cptflow.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from cptflow.kernels.geglu import geglu, geglu_reference
from cptflow.kernels.patch import apply_kernels, kernels_for_family
from cptflow.kernels.rms_norm import gemma_rms_norm, gemma_rms_norm_reference, rms_norm, rms_norm_reference
from cptflow.kernels.swiglu import swiglu, swiglu_gate_up, swiglu_gate_up_reference, swiglu_reference

__all__ = [
    "apply_kernels",
    "fused_linear_cross_entropy",
    "geglu",
    "geglu_reference",
    "gemma_rms_norm",
    "gemma_rms_norm_reference",
    "kernels_for_family",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_gate_up",
    "swiglu_gate_up_reference",
    "swiglu_reference",
    "use_triton",
]
