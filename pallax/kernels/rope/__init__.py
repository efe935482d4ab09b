"""Rotary position embeddings."""

from pallax.kernels.rope.api import apply_rope, rope_reference

__all__ = ["apply_rope", "rope_reference"]
