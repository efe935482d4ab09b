"""pallax: the Gemini 1.0 systems recipe as a JAX library.

Kernels live in :mod:`pallax.kernels`; the most used ones are re-exported here.
"""

from pallax.kernels import interpret_mode, rms_norm

__version__ = "0.1.0.dev0"
__all__ = ["interpret_mode", "rms_norm"]
