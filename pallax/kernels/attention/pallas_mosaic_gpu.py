"""Flash attention forward as a Mosaic GPU (Hopper) kernel; backward on the XLA path.

Layout: the G = N / K query heads that share a KV head are packed into the rows
of one tile, position-major ([B, K, T * G, H], row = t * G + g), so a CTA reads
each K/V block once for the whole group and never materialises repeated K/V
heads. Grid (B, K, row blocks of 64): one warpgroup per CTA owns 64 rows
(64 / G positions) in the WGMMA register layout and walks the K/V blocks it
needs (causal / window / lengths give the range; other blocks are neither
copied nor computed). K/V blocks are TMA-copied into two swizzled SMEM slots,
the next block loading while this one is used:

  S = Q K^T     wgmma, f32 accumulator [64, block_kv]
  mask          (causal, window, lengths, segments: masks.allowed on iotas), soft cap
  online softmax in f32 (row max, rescale, row sum in the WGMMA row layout)
  O += P V      wgmma with P (bf16/f16) from registers

The output and the log-sum-exp are written per 64-row block. The backward is the
XLA path's recomputing backward, fed with this kernel's log-sum-exp.

The same kernel runs in JAX's GPU interpreter with the two matmuls computed by
``dot_general`` on the loaded tiles (the interpreter cannot run wgmma): the
copies, block ranges, masks and softmax bookkeeping are tested on CPU; the
wgmma path is verified on a real GPU (tests marked ``gpu``).

Not taken by this kernel (``unsupported_reason``; ``implementation=None`` then
uses XLA): bias and mask arrays, float32 inputs, head sizes not a multiple of
64, groups G that do not divide 64.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels._mgpu import lookup, tma_table
from pallax.kernels.attention import xla
from pallax.kernels.attention.masks import MaskSpec, allowed

BLOCK_Q = 64  # rows per CTA: one warpgroup's WGMMA tile
_WG = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)
_COL = plgpu.Layout.WGMMA.reduce(0)
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))
_LSE_PAD = 1e30  # log-sum-exp of padded rows: exp(s - lse) = 0 in the backward


def unsupported_reason(q_shape, k_shape, dtype, *, bias, mask, block_kv: int) -> str | None:
    n, h, kh = q_shape[2], q_shape[3], k_shape[2]
    g = n // kh
    if bias is not None or mask is not None:
        return "bias and mask arrays are not supported (use segment_ids / lengths / windows)"
    if jnp.dtype(dtype) not in map(jnp.dtype, (jnp.bfloat16, jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} must be bfloat16 or float16 (wgmma)"
    if h % 64 or h > 256:
        return f"the head size H={h} must be a multiple of 64, at most 256"
    if BLOCK_Q % g:
        return f"the group size N/K={g} must divide {BLOCK_Q}"
    if block_kv not in (64, 128):
        return f"block_kv={block_kv} must be 64 or 128"
    return None


@dataclasses.dataclass(frozen=True)
class _Static:
    g: int
    h: int
    s: int  # cache length after padding to >= block_kv
    bk: int
    spec: MaskSpec
    scale: float
    soft_cap: float | None
    segments: bool
    interpret: bool


def _block_range(st: _Static, row0, q_len, kv_len):
    """First and last K/V block (inclusive) that rows [row0, row0 + 64) attend to."""
    shift = st.g.bit_length() - 1
    pos_lo, pos_hi = row0 >> shift, (row0 + BLOCK_Q - 1) >> shift
    last_pos = kv_len - 1
    if st.spec.causal:
        last_pos = jnp.minimum(last_pos, pos_hi)
    first = jnp.int32(0)
    if st.spec.window is not None:
        left, right = st.spec.window
        last_pos = jnp.minimum(last_pos, pos_hi + right)
        first = jax.lax.div(jnp.maximum(pos_lo - left, 0), st.bk)
    last = jnp.where((last_pos < 0) | (pos_lo >= q_len), -1, jax.lax.div(last_pos, st.bk))
    return first, last


def _kernel(st: _Static):
    bk, h, shift = st.bk, st.h, st.g.bit_length() - 1

    def body(lens_gmem, q_gmem, k_gmem, v_gmem, qseg_gmem, kvseg_gmem, out_gmem, lse_gmem):
        b = jax.lax.axis_index("b")
        kh = jax.lax.axis_index("k")
        row0 = jax.lax.axis_index("rows") * BLOCK_Q

        def scoped(lens_smem, q_smem, k_smem, v_smem, qseg_smem, kvseg_smem, lse_smem, bars):
            # bars: 0 lengths, 1 q, 2 q segments; per slot: 3+ K, 5+ V, 7+ kv segments.
            plgpu.copy_gmem_to_smem(lens_gmem.at[0], lens_smem, bars.at[0])
            plgpu.copy_gmem_to_smem(q_gmem.at[b, kh, pl.ds(row0, BLOCK_Q)], q_smem, bars.at[1])
            if st.segments:
                plgpu.copy_gmem_to_smem(
                    qseg_gmem.at[b, pl.ds(row0, BLOCK_Q)], qseg_smem, bars.at[2]
                )
                plgpu.barrier_wait(bars.at[2])
            plgpu.barrier_wait(bars.at[0])
            plgpu.barrier_wait(bars.at[1])
            q_len, kv_len = lookup(lens_smem, 2 * b), lookup(lens_smem, 2 * b + 1)
            first, last = _block_range(st, row0, q_len, kv_len)

            def start_of(j):  # the last block is moved back to end at S (masked below)
                return jnp.minimum(j * bk, st.s - bk)

            def issue(j, slot):
                rows = pl.ds(start_of(j), bk)
                plgpu.copy_gmem_to_smem(k_gmem.at[b, rows, kh], k_smem.at[slot], bars.at[3 + slot])
                plgpu.copy_gmem_to_smem(v_gmem.at[b, rows, kh], v_smem.at[slot], bars.at[5 + slot])
                if st.segments:
                    plgpu.copy_gmem_to_smem(
                        kvseg_gmem.at[b, rows], kvseg_smem.at[slot], bars.at[7 + slot]
                    )

            @pl.when(first <= last)
            def _prefetch():
                issue(first, 0)

            q_pos = jax.lax.shift_right_logical(
                row0 + plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, bk), 0, layout=_WG), shift
            )
            q_seg = None
            if st.segments:
                q_seg_rows = plgpu.load(qseg_smem, layout=_ROW)
                q_seg = jax.lax.broadcast_in_dim(q_seg_rows, (BLOCK_Q, bk), (0,))

            def step(j, carry):
                acc, m, denom = carry
                slot = jax.lax.rem(j - first, 2)

                @pl.when(j < last)
                def _next():  # the other slot was released by the barrier ending step j - 1
                    issue(j + 1, 1 - slot)

                plgpu.barrier_wait(bars.at[3 + slot])
                s = _qk(st, q_smem, k_smem.at[slot])  # [64, bk] f32
                s = s * st.scale
                if st.soft_cap is not None:
                    s = st.soft_cap * jnp.tanh(s / st.soft_cap)
                k_pos = start_of(j) + plgpu.broadcasted_iota(
                    jnp.int32, (BLOCK_Q, bk), 1, layout=_WG
                )
                kv_seg = None
                if st.segments:
                    plgpu.barrier_wait(bars.at[7 + slot])
                    kv_seg_cols = plgpu.load(kvseg_smem.at[slot], layout=_COL)
                    kv_seg = jax.lax.broadcast_in_dim(kv_seg_cols, (BLOCK_Q, bk), (1,))
                ok = allowed(
                    st.spec, q_pos, k_pos, q_len=q_len, kv_len=kv_len, q_seg=q_seg, kv_seg=kv_seg
                )
                ok = ok & (k_pos >= j * bk)  # rows of a moved-back block seen before
                s = jnp.where(ok, s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - jax.lax.broadcast_in_dim(m_safe, s.shape, (0,)))
                alpha = jnp.exp(m - m_safe)
                denom = alpha * denom + jnp.sum(p, axis=1)
                acc = acc * jax.lax.broadcast_in_dim(alpha, acc.shape, (0,))
                plgpu.barrier_wait(bars.at[5 + slot])
                acc = _pv(st, acc, p.astype(q_smem.dtype), v_smem.at[slot])
                plgpu.commit_smem()  # all threads are done with this slot before it refills
                return acc, m_new, denom

            init = (
                plgpu.layout_cast(jnp.zeros((BLOCK_Q, h), jnp.float32), _WG),
                plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), _ROW),
                plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), _ROW),
            )
            acc, m, denom = jax.lax.fori_loop(first, last + 1, step, init)
            live = denom > 0
            inv = jnp.where(live, 1.0 / jnp.where(live, denom, 1.0), 0.0)
            out = acc * jax.lax.broadcast_in_dim(inv, acc.shape, (0,))
            q_smem[...] = out.astype(q_smem.dtype)  # the Q tile becomes the output tile
            lse_smem[...] = jnp.where(live, m + jnp.log(jnp.where(live, denom, 1.0)), _LSE_PAD)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, out_gmem.at[b, kh, pl.ds(row0, BLOCK_Q)])
            plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[b, kh, pl.ds(row0, BLOCK_Q)])
            plgpu.wait_smem_to_gmem(0)

        return scoped

    return body


def _qk(st: _Static, q_smem, k_slot):
    if st.interpret:  # the GPU interpreter has no wgmma
        q = plgpu.load(q_smem, layout=_WG)
        k = plgpu.load(k_slot, layout=_WG)
        return jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)

    def compute(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_slot.transpose((1, 0)))
        return acc_ref[...]

    return pl.run_scoped(compute, plgpu.ACC((BLOCK_Q, st.bk), jnp.float32))


def _pv(st: _Static, acc, p, v_slot):
    if st.interpret:
        v = plgpu.load(v_slot, layout=_WG)
        return acc + jax.lax.dot_general(p, v, _NN, preferred_element_type=jnp.float32)

    def compute(acc_ref):
        plgpu.wgmma(acc_ref, p, v_slot)

    return pl.run_state(compute)(plgpu.ACC.init(acc))


def _smem(shape, dtype):
    swizzle = 128  # bytes: rows of 64 bf16/f16 elements
    transforms = (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def forward(q, k, v, aux, options: xla.Options):
    """(out [B, T, N, H], lse [B, K, G, T]) for the kernel's cases (see unsupported_reason)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g, bk = n // kh, options.block_kv
    # One block must fit, and TMA into 8-row SMEM tiles needs S % 8 == 0: pad (a copy of
    # K/V only for such S); the padded rows are masked by the lengths.
    s_pad = max(bk, -(-s // 8) * 8)
    if s_pad != s:
        pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    rows = t * g
    rows_p = -(-rows // BLOCK_Q) * BLOCK_Q
    q_rows = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
    q_len = jnp.full((b,), t, jnp.int32) if aux[0] is None else jnp.clip(aux[0], 0, t)
    kv_len = jnp.full((b,), s, jnp.int32) if aux[1] is None else jnp.clip(aux[1], 0, s)
    lens = tma_table(jnp.stack([q_len, kv_len], axis=1).reshape(1, 2 * b))
    segments = aux[2] is not None
    if segments:
        q_seg = jnp.pad(jnp.repeat(aux[2], g, axis=1), ((0, 0), (0, rows_p - rows)))
        kv_seg = jnp.pad(aux[3], ((0, 0), (0, s_pad - s)))
    else:
        q_seg, kv_seg = jnp.zeros((1, BLOCK_Q), jnp.int32), jnp.zeros((1, bk), jnp.int32)
    st = _Static(
        g, h, s_pad, bk, options.spec, options.scale, options.soft_cap, segments,
        options.interpret is not None,
    )  # fmt: skip
    body = _kernel(st)

    def kernel(lens_gmem, q_gmem, k_gmem, v_gmem, qseg_gmem, kvseg_gmem, out_gmem, lse_gmem):
        pl.run_scoped(
            body(lens_gmem, q_gmem, k_gmem, v_gmem, qseg_gmem, kvseg_gmem, out_gmem, lse_gmem),
            plgpu.SMEM(lens.shape[1:], jnp.int32),
            _smem((BLOCK_Q, h), q.dtype),
            _smem((2, bk, h), k.dtype),
            _smem((2, bk, h), v.dtype),
            plgpu.SMEM((BLOCK_Q,), jnp.int32),
            plgpu.SMEM((2, bk), jnp.int32),
            plgpu.SMEM((BLOCK_Q,), jnp.float32),
            plgpu.Barrier(num_barriers=9),
        )

    interpret = options.interpret
    out, lse = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, kh, rows_p, h), q.dtype),
            jax.ShapeDtypeStruct((b, kh, rows_p), jnp.float32),
        ),
        grid=(b, kh, rows_p // BLOCK_Q),
        grid_names=("b", "k", "rows"),
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=4 * 4 * bk),
        interpret=None
        if interpret is None
        else plgpu.InterpretGPUParams(detect_races=interpret.detect_races),
    )(lens, q_rows, k, v, q_seg, kv_seg)
    out = out[:, :, :rows].reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    lse = lse[:, :, :rows].reshape(b, kh, t, g).transpose(0, 1, 3, 2)  # [B, K, G, T]
    return out, lse


def _backward_options(options: xla.Options, t: int, s: int) -> xla.Options:
    """The XLA backward's own (larger) tiles."""
    return dataclasses.replace(options, block_q=min(512, t), block_kv=min(512, s), interpret=None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, k, v, aux, options: xla.Options):
    return forward(q, k, v, aux, options)[0]


def _fwd(q, k, v, aux, options):
    out, lse = forward(q, k, v, aux, options)
    return out, (q, k, v, aux, out, lse)


def _bwd(options, residuals, dout):
    q, k, v, aux, out, lse = residuals
    t, s = q.shape[1], k.shape[1]
    bwd_options = _backward_options(options, t, s)
    tp = -(-t // bwd_options.block_q) * bwd_options.block_q
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, 0), (0, tp - t)), constant_values=_LSE_PAD)
    dq, dk, dv, _, _, _ = xla._bwd(bwd_options, (q, k, v, None, None, aux, out, lse), dout)
    return dq, dk, dv, None


attention.defvjp(_fwd, _bwd)
