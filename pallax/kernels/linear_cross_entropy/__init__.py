"""Linear projection + softmax cross-entropy without materialised logits."""

from pallax.kernels.linear_cross_entropy.api import linear_cross_entropy
from pallax.kernels.linear_cross_entropy.config import LinearCrossEntropyBlockSizes
from pallax.kernels.linear_cross_entropy.reference import linear_cross_entropy_reference

__all__ = [
    "LinearCrossEntropyBlockSizes",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]
