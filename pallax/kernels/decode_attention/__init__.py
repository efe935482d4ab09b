"""Decode attention over a KV cache (contiguous or paged), MQA/GQA, split-K."""

from pallax.kernels.decode_attention.api import decode_attention, paged_decode_attention
from pallax.kernels.decode_attention.config import DecodeBlockSizes
from pallax.kernels.decode_attention.reference import decode_attention_reference

__all__ = [
    "DecodeBlockSizes",
    "decode_attention",
    "decode_attention_reference",
    "paged_decode_attention",
]
