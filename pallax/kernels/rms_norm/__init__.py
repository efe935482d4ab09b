"""RMSNorm: public function, block sizes and reference."""

from pallax.kernels.rms_norm.api import rms_norm
from pallax.kernels.rms_norm.config import RmsNormBlockSizes
from pallax.kernels.rms_norm.reference import rms_norm_reference

__all__ = ["RmsNormBlockSizes", "rms_norm", "rms_norm_reference"]
