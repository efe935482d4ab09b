"""pallax kernels: one public function per op, each with
``implementation=None | 'xla' | 'pallas_tpu' | 'pallas_mosaic_gpu'``.

This package imports nothing else from pallax.
"""

from pallax.kernels._dispatch import (
    IMPLEMENTATIONS,
    KernelMode,
    interpret_mode,
    lowering_platform,
    tpu_interpret_params,
)
from pallax.kernels._dispatch import resolve as resolve_implementation
from pallax.kernels._partition import kernel_layout
from pallax.kernels.attention import (
    AttentionBlockSizes,
    attention_reference,
    dot_product_attention,
)
from pallax.kernels.decode_attention import (
    DecodeBlockSizes,
    decode_attention,
    decode_attention_reference,
    paged_decode_attention,
)
from pallax.kernels.gated_mlp import GatedMlpBlockSizes, gated_mlp, gated_mlp_reference
from pallax.kernels.linear_cross_entropy import (
    LinearCrossEntropyBlockSizes,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from pallax.kernels.rms_norm import RmsNormBlockSizes, rms_norm, rms_norm_reference
from pallax.kernels.rope import apply_rope, rope_reference

__all__ = [
    "IMPLEMENTATIONS",
    "AttentionBlockSizes",
    "DecodeBlockSizes",
    "GatedMlpBlockSizes",
    "KernelMode",
    "LinearCrossEntropyBlockSizes",
    "RmsNormBlockSizes",
    "apply_rope",
    "attention_reference",
    "decode_attention",
    "decode_attention_reference",
    "dot_product_attention",
    "gated_mlp",
    "gated_mlp_reference",
    "interpret_mode",
    "kernel_layout",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "lowering_platform",
    "paged_decode_attention",
    "resolve_implementation",
    "rms_norm",
    "rms_norm_reference",
    "rope_reference",
    "tpu_interpret_params",
]
