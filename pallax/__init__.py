"""pallax: the Gemini 1.0 systems recipe as a JAX library.

Kernels live in :mod:`pallax.kernels`; the most used ones are re-exported here.
"""

from pallax.kernels import (
    apply_rope,
    dot_product_attention,
    gated_mlp,
    interpret_mode,
    linear_cross_entropy,
    rms_norm,
)

__version__ = "0.1.0.dev0"
__all__ = [
    "apply_rope",
    "dot_product_attention",
    "gated_mlp",
    "interpret_mode",
    "linear_cross_entropy",
    "rms_norm",
]
