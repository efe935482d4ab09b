"""All-gather-matmul as one Mosaic TPU kernel: the ring is remote DMAs.

Inside ``shard_map``: x [m, k] (this device's rows), w [k, n_w] -> [n*m, n_w],
equal to ``all_gather(x) @ w``. Each step multiplies the chunk in hand while a
remote DMA forwards it to the right-hand neighbour, double-buffered:

  step s: chunk in buf[s % 2] came from device (me - s) mod n
          start DMA buf[s % 2] -> right neighbour's buf[(s + 1) % 2]
          out[rows of (me - s)] = buf[s % 2] @ w          (overlaps the DMA)
          wait for our send and for the left neighbour's DMA into buf[(s + 1) % 2]
          tell the left neighbour that our buf[s % 2] is free again

Flow control: before step s's send (s >= 1), a device waits until its right
neighbour has signalled that the destination slot is free, i.e. that the
neighbour finished the matmul and the send of step s - 1 that used it.
Without it a fast device could overwrite a slot its neighbour is still reading
(the interpreter's race detector catches exactly that, see the tests).

The operands live in VMEM whole (x twice, w, and the [n*m, n_w] output), so
this kernel is for tiles that fit VMEM; an HBM-streaming variant would wrap
the per-step matmul in ``pltpu.emit_pipeline``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.collectives import ring

# VMEM the kernel may use: v5e/v6e have 128 MiB, v4/v5p 16-32 MiB scoped by default.
_VMEM_BUDGET_BYTES = 12 << 20


def _kernel(
    x_ref, w_ref, o_ref, buf, send_sems, recv_sems, free_sem, *, axis_name, n, flow_control
):
    # x_ref [m, k]; w_ref [k, n_w]; o_ref [n*m, n_w]; buf [2, m, k]
    m = x_ref.shape[0]
    me = lax.axis_index(axis_name)
    right = lax.rem(me + 1, n)
    left = lax.rem(me + n - 1, n)

    pltpu.async_copy(x_ref, buf.at[0], recv_sems.at[0]).wait()
    # Every device must be inside the kernel before anyone writes into its scratch.
    barrier = pltpu.get_barrier_semaphore()
    pl.semaphore_signal(barrier, 1, device_id={axis_name: left})
    pl.semaphore_signal(barrier, 1, device_id={axis_name: right})
    pl.semaphore_wait(barrier, 2)

    for step in range(n):  # n is static: the ring is unrolled
        slot = step % 2
        copy = None
        if step < n - 1:
            if step > 0 and flow_control:
                pl.semaphore_wait(free_sem, 1)  # right neighbour's buf[1 - slot] is free
            copy = pltpu.make_async_remote_copy(
                buf.at[slot],
                buf.at[1 - slot],
                send_sems.at[slot],
                recv_sems.at[1 - slot],
                device_id={axis_name: right},
            )
            copy.start()
        source = lax.rem(me + n - step, n)
        rows = pl.ds(pl.multiple_of(source * m, m), m)
        o_ref[rows, :] = jnp.dot(buf[slot], w_ref[...], preferred_element_type=jnp.float32).astype(
            o_ref.dtype
        )
        if copy is not None:
            copy.wait_send()
            copy.wait_recv()
            if step < n - 2 and flow_control:  # the left neighbour sends into buf[slot] next
                pl.semaphore_signal(free_sem, 1, device_id={axis_name: left})


def unsupported_reason(m: int, k: int, n_w: int, n: int, itemsize: int) -> str | None:
    """Why the kernel cannot take this call (None if it can)."""
    if m % 8:
        return f"rows per device x.shape[0]={m} must be a multiple of 8 (TPU sublanes)"
    vmem = (3 * m * k + k * n_w + n * m * n_w) * itemsize
    if vmem > _VMEM_BUDGET_BYTES:
        return f"operands need {vmem} bytes of VMEM, over the {_VMEM_BUDGET_BYTES}-byte budget"
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _differentiable(x, w, axis_name, interpret):
    return _forward(x, w, axis_name, interpret, True)


def _fwd(x, w, axis_name, interpret):
    return _forward(x, w, axis_name, interpret, True), (x, w)


def _bwd(axis_name, interpret, residuals, dy):
    # The transpose is a matmul-reduce-scatter plus a streamed weight gradient:
    # the ring schedules' backward, overlapped the same way.
    return ring._agm_bwd(axis_name, False, residuals, dy)


_differentiable.defvjp(_fwd, _bwd)


def all_gather_matmul_pallas(
    x: jax.Array, w: jax.Array, *, axis_name: str, interpret=False, _flow_control: bool = True
) -> jax.Array:
    """``all_gather(x) @ w`` on the ring ``axis_name`` as a Mosaic TPU kernel.

    Differentiable: the backward runs the ring schedules of ``ring.py``.

    Inside ``shard_map``. x: [m, k] with m a multiple of 8; w: [k, n_w].
    ``interpret``: False, or ``pltpu.InterpretParams(...)`` to run on a CPU.
    ``_flow_control=False`` drops the slot-free handshake; it exists so the tests
    can show that the race detector then finds the race.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"all_gather_matmul_pallas: expected x [m, k], w [k, n_w]; got {x.shape=}, {w.shape=}"
        )
    n = lax.axis_size(axis_name)
    itemsize = max(x.dtype.itemsize, w.dtype.itemsize)
    reason = unsupported_reason(x.shape[0], x.shape[1], w.shape[1], n, itemsize)
    if reason is not None:
        raise ValueError(f"all_gather_matmul_pallas: {reason}")
    if not _flow_control:
        return _forward(x, w, axis_name, interpret, False)
    return _differentiable(x, w, axis_name, interpret)


def _forward(x, w, axis_name, interpret, flow_control):
    m, k = x.shape
    n = lax.axis_size(axis_name)
    out_dtype = jnp.result_type(x, w)
    if n == 1:
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype)
    vmem_spec = pl.BlockSpec(memory_space=pltpu.VMEM)
    return pl.pallas_call(
        functools.partial(_kernel, axis_name=axis_name, n=n, flow_control=flow_control),
        out_shape=jax.ShapeDtypeStruct((n * m, w.shape[1]), out_dtype),
        in_specs=[vmem_spec, vmem_spec],
        out_specs=vmem_spec,
        scratch_shapes=[
            pltpu.VMEM((2, m, k), x.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.REGULAR,
        ],
        compiler_params=pltpu.CompilerParams(collective_id=0, has_side_effects=True),
        interpret=interpret,
        name="pallax_all_gather_matmul",
    )(x, w)
