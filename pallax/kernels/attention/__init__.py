"""Multi-query / grouped-query attention (a drop-in for jax.nn.dot_product_attention)."""

from pallax.kernels.attention.api import dot_product_attention
from pallax.kernels.attention.config import AttentionBlockSizes
from pallax.kernels.attention.reference import attention_reference

__all__ = ["AttentionBlockSizes", "attention_reference", "dot_product_attention"]
