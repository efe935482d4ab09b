"""Gated MLP (GeGLU / SwiGLU) with a recomputing backward."""

from pallax.kernels.gated_mlp.api import gated_mlp
from pallax.kernels.gated_mlp.config import GatedMlpBlockSizes
from pallax.kernels.gated_mlp.reference import gated_mlp_reference

__all__ = ["GatedMlpBlockSizes", "gated_mlp", "gated_mlp_reference"]
