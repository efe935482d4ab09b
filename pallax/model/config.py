"""The decoder's configuration: a small frozen dataclass and named presets."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallax.kernels import IMPLEMENTATIONS
from pallax.kernels.gated_mlp.activations import ACTIVATIONS

REMAT_POLICIES = ("none", "full", "save_attention")
# Byte-level tokens: 256 bytes, PAD (256), BOS (257), EOS (258), and 5 unused ids so
# the vocabulary (264 = 8 * 33) divides tensor-parallel axes of up to 8.
BYTE_VOCAB = 264
PAD, BOS, EOS = 256, 257, 258


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = BYTE_VOCAB
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 1  # 1 = multi-query attention (Gemini), < n_heads = grouped-query
    head_dim: int = 16
    d_ff: int = 256
    max_seq_len: int = 128
    rope_base: float = 10000.0
    activation: str = "gelu_tanh"
    tie_embeddings: bool = True
    logits_soft_cap: float | None = None
    dtype: str = "float32"  # activations and matmul inputs
    param_dtype: str = "float32"  # master weights
    remat: str = "none"
    implementation: str | None = None  # kernel dispatch for every op
    # Under a mesh whose 'tensor' axis has more than one device, run the MLP as
    # ring collective matmuls over 'tensor' (all-gather -> up/gate, down ->
    # reduce-scatter) instead of leaving its collectives to GSPMD.
    tensor_parallel_collectives: bool = False

    def __post_init__(self):
        positive = (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "d_ff",
            "max_seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"Config: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Config.activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Config.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"Config.implementation must be None or one of {IMPLEMENTATIONS}, "
                f"got {self.implementation!r}"
            )
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"Config.{name}={getattr(self, name)!r} is not a dtype") from e
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(
                f"Config.logits_soft_cap must be None or > 0, got {self.logits_soft_cap}"
            )

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


# Nano sizes from the Gemini report (1.8B and 3.25B parameters, 32k context); the
# report gives no shapes, so these are Gemma-like choices (MQA, 256-wide heads,
# GeGLU with 8x d_model, a 256k vocabulary) that land on those counts.
PRESETS: dict[str, Config] = {
    "tiny": Config(),
    "small": Config(
        d_model=768, n_layers=12, n_heads=12, n_kv_heads=1, head_dim=64, d_ff=3072, max_seq_len=1024
    ),
    "nano1": Config(
        vocab_size=256000,
        d_model=2048,
        n_layers=12,
        n_heads=8,
        n_kv_heads=1,
        head_dim=256,
        d_ff=16384,
        max_seq_len=32768,
        dtype="bfloat16",
    ),
    "nano2": Config(
        vocab_size=256000,
        d_model=2560,
        n_layers=15,
        n_heads=10,
        n_kv_heads=1,
        head_dim=256,
        d_ff=20480,
        max_seq_len=32768,
        dtype="bfloat16",
    ),
}
