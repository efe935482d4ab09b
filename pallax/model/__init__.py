"""The Gemini-style decoder: config, parameters, forward/loss and generation.

The training step, data pipeline and ``python -m pallax.train`` are still to come.
"""

from pallax.model.config import BOS, BYTE_VOCAB, EOS, PAD, PRESETS, Config
from pallax.model.generate import decode_step, generate, prefill
from pallax.model.params import count_params, init_params, param_axes
from pallax.model.transformer import forward, logits, loss

__all__ = [
    "BOS",
    "BYTE_VOCAB",
    "EOS",
    "PAD",
    "PRESETS",
    "Config",
    "count_params",
    "decode_step",
    "forward",
    "generate",
    "init_params",
    "logits",
    "loss",
    "param_axes",
    "prefill",
]
