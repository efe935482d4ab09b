"""pallax kernels: one public function per op, each with
``implementation=None | 'xla' | 'pallas_tpu' | 'pallas_mosaic_gpu'``.

This package imports nothing else from pallax.
"""

from pallax.kernels._dispatch import IMPLEMENTATIONS, interpret_mode, lowering_platform
from pallax.kernels.rms_norm import RmsNormBlockSizes, rms_norm, rms_norm_reference

__all__ = [
    "IMPLEMENTATIONS",
    "RmsNormBlockSizes",
    "interpret_mode",
    "lowering_platform",
    "rms_norm",
    "rms_norm_reference",
]
