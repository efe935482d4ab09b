"""The training step of the decoder: step time, tokens/s and MFU (the roofline
fraction of a compute-bound case is its MFU: bytes are not counted).

On a CPU the mesh is the 8 simulated devices when present (data=2, fsdp=2,
tensor=2), else one device; peaks are measured in the same run. The report
times the step's components in isolation at the step's shapes (not a profiler
trace of the fused step).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from pallax.bench._harness import Case
from pallax.kernels import dot_product_attention, gated_mlp, linear_cross_entropy, rms_norm
from pallax.model import PRESETS, data
from pallax.model.train import TrainConfig, batch_sharding, init_state, make_train_step, step_flops
from pallax.sharding import MeshConfig, make_mesh

_SIZES = {  # preset, batch, seq_len
    "smoke": [("tiny", 8, 32)],
    "cpu": [("tiny", 16, 128), ("small", 4, 128)],
    "full": [("tiny", 64, 512), ("small", 16, 1024)],
}


def _mesh():
    devices = jax.devices()
    if devices[0].platform == "cpu" and len(devices) >= 8:
        return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices=devices[:8])
    return make_mesh(MeshConfig(), devices=devices)


def _setup(preset, batch, seq_len):
    config = PRESETS[preset].replace(max_seq_len=max(PRESETS[preset].max_seq_len, seq_len))
    if jax.devices()[0].platform != "cpu":
        config = config.replace(dtype="bfloat16")
    mesh = _mesh()
    tc = TrainConfig(total_steps=1000)
    state = init_state(config, tc, mesh, jax.random.key(0))
    rows = data.PackedRows.build(seq_len)
    host = next(data.DataIterator(rows, batch))
    sharding = batch_sharding(mesh)
    batch_arrays = {k: jax.device_put(v, sharding) for k, v in host.items()}
    return config, tc, mesh, state, batch_arrays


def cases(size: str) -> list[Case]:
    out = []
    for preset, batch, seq_len in _SIZES[size]:
        config, tc, mesh, state, batch_arrays = _setup(preset, batch, seq_len)
        step = make_train_step(config, tc, mesh)
        holder = {"state": state}

        def run(batch_arrays, step=step, holder=holder):
            holder["state"], metrics = step(holder["state"], batch_arrays)  # donated: keep latest
            return metrics["loss"]

        out.append(
            Case(
                "model",
                f"train step {preset} B={batch} T={seq_len}",
                "pallax",
                run,
                (batch_arrays,),
                flops=step_flops(config, batch * seq_len),
                bytes=0.0,
            )
        )
    return out


def report(size: str) -> list[dict]:
    """Forward+backward time of each component at the first case's shapes, in isolation."""
    preset, batch, seq_len = _SIZES[size][0]
    c = PRESETS[preset]
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (batch, seq_len, c.d_model))
    q = jax.random.normal(keys[1], (batch, seq_len, c.n_heads, c.head_dim))
    kv = jax.random.normal(keys[2], (batch, seq_len, c.n_kv_heads, c.head_dim))
    w1 = jax.random.normal(keys[3], (c.d_model, c.d_ff)) * 0.02
    w2 = jax.random.normal(keys[4], (c.d_ff, c.d_model)) * 0.02
    emb = jax.random.normal(keys[5], (c.d_model, c.vocab_size)) * 0.02
    labels = jax.random.randint(keys[6], (batch * seq_len,), 0, c.vocab_size)
    parts = {
        "rms_norm": (lambda x: rms_norm(x, jnp.zeros(c.d_model), scale_offset=1.0), (x,)),
        "attention": (lambda q, k, v: dot_product_attention(q, k, v, is_causal=True), (q, kv, kv)),
        "gated_mlp": (lambda x, a, b, d: gated_mlp(x, a, b, d), (x, w1, w1, w2)),
        "linear_cross_entropy": (
            lambda h, w: linear_cross_entropy(h, w, labels),
            (x.reshape(-1, c.d_model), emb),
        ),
    }
    rows = []
    for name, (fn, args) in parts.items():
        grad = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))))
        jax.block_until_ready(grad(*args))
        start = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(grad(*args))
        per_layer = name in ("rms_norm", "attention", "gated_mlp")
        count = c.n_layers * (2 if name == "rms_norm" else 1) if per_layer else 1
        rows.append(
            dict(
                preset=preset,
                component=name,
                calls_per_step=count,
                ms_per_call=(time.perf_counter() - start) / 3 * 1e3,
            )
        )
    return rows
