"""Triton kernels for training, each beside its PyTorch reference: fused lm_head + loss, RMSNorm, SwiGLU.

Used by the cpt/sft training stages; CUDA tensors run Triton, CPU tensors the PyTorch path (see _dispatch).
"""

from cptflow.kernels._dispatch import use_triton
from cptflow.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from cptflow.kernels.patch import apply_kernels, kernels_for_family
from cptflow.kernels.rms_norm import rms_norm, rms_norm_reference
from cptflow.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "apply_kernels",
    "fused_linear_cross_entropy",
    "kernels_for_family",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "use_triton",
]
