"""Silent-data-corruption checks: fingerprints of each physical replica, a
known-answer scanner for idle devices, and a deterministic bit-flip injector."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallax.fault.fingerprint import fingerprint


def device_fingerprints(tree, mesh: Mesh) -> np.ndarray:
    """uint32 [*mesh.shape, n_leaves, 2]: each device's fingerprint of its own shards.

    ``tree`` holds arrays sharded over ``mesh`` (replicated over some axes). Every
    device fingerprints its local shards inside a shard_map, so corruption on one
    copy shows up although JAX believes the copies are identical.
    """
    specs = jax.tree.map(
        lambda x: x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec(),
        tree,
    )
    spec_leaves, treedef = jax.tree.flatten(specs)
    fps = _fingerprinter(mesh, treedef, tuple(spec_leaves))(tree)
    # Gathered inside the jitted function: replicated, so every process has it all.
    fps = np.asarray(fps.addressable_data(0))
    return fps.reshape(tuple(mesh.shape.values()) + fps.shape[1:])


def replica_fingerprints(tree, mesh: Mesh, axis: str = "data") -> np.ndarray:
    """uint32 [replicas, n]: each replica's fingerprint of its own copy of ``tree``.

    Row r concatenates the fingerprints of the devices whose ``axis`` index is r
    (see :func:`device_fingerprints`).
    """
    fps = np.moveaxis(device_fingerprints(tree, mesh), mesh.axis_names.index(axis), 0)
    return fps.reshape(fps.shape[0], -1)


@functools.lru_cache(maxsize=32)
def _fingerprinter(mesh: Mesh, treedef, spec_leaves):
    """A jitted per-device fingerprint for one tree structure and sharding (cached)."""
    names = mesh.axis_names
    specs = jax.tree.unflatten(treedef, list(spec_leaves))

    def local(t):  # -> [devices, L, 2], devices in mesh order, on every device
        return jax.lax.all_gather(fingerprint(t), names)

    return jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(specs,), out_specs=PartitionSpec(), check_vma=False
        )
    )


def flip_bit(x: jax.Array, *, device_index: int, element: int, bit: int) -> jax.Array:
    """A copy of ``x`` whose buffer on one device has one flipped bit (failure injection).

    The result keeps x's sharding: for a replicated array the replicas now differ,
    exactly what silent corruption on one chip does. ``device_index`` counts this
    process's addressable shards; -1 flips nothing here (other processes of a
    multi-process job call it too).
    """
    shards = []
    for i, shard in enumerate(x.addressable_shards):
        data = np.asarray(shard.data).copy()
        if i == device_index:
            raw = data.view(
                {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[data.dtype.itemsize]
            ).reshape(-1)
            raw[element % raw.size] ^= np.asarray(1 << bit).astype(raw.dtype)
        shards.append(jax.device_put(data, shard.device))
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards)


@dataclasses.dataclass(frozen=True)
class ScanResult:
    device: str
    matmul_exact: bool
    attention_max_error: float
    ok: bool


def _golden_inputs(seed: int):
    rng = np.random.default_rng(seed)
    a = rng.integers(-8, 9, (256, 256)).astype(np.float32)
    b = rng.integers(-8, 9, (256, 256)).astype(np.float32)
    q = rng.standard_normal((1, 64, 4, 64)).astype(np.float32)
    kv = rng.standard_normal((1, 64, 1, 64)).astype(np.float32)
    return a, b, q, kv


def _attention_f64(q, k, v):
    logits = np.einsum("btnh,bsh->bnts", q.astype(np.float64), k[:, :, 0].astype(np.float64))
    logits = logits / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsh->btnh", p, v[:, :, 0].astype(np.float64))


def scan(devices=None, *, seed: int = 0, attention_tolerance: float = 1e-4) -> list[ScanResult]:
    """Runs known-answer workloads on each device (e.g. idle or hot-standby chips).

    Matmul: integer-valued f32 operands whose product is exact in f32, compared
    bit for bit with the host's int64 answer. Attention: pallax's
    dot_product_attention (causal MQA) against a float64 host reference.
    """
    from pallax.kernels import dot_product_attention

    a, b, q, kv = _golden_inputs(seed)
    golden_mm = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.float32)
    golden_attn = _attention_f64(q, kv, kv)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
    attention = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True))
    results = []
    for device in devices if devices is not None else jax.devices():
        put = lambda x, d=device: jax.device_put(x, d)
        mm = np.asarray(matmul(put(a), put(b)))
        attn = np.asarray(attention(put(q), put(kv), put(kv)), np.float64)
        error = float(np.max(np.abs(attn - golden_attn)))
        exact = bool(np.array_equal(mm, golden_mm))
        results.append(
            ScanResult(str(device), exact, error, exact and error <= attention_tolerance)
        )
    return results
