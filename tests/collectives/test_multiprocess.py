"""The same collective matmul across 2 jax.distributed processes and in 1 process."""

from __future__ import annotations

import json

from pallax.testing import run_processes, run_with_cpu_devices

# Runs on 4 devices however they are spread over processes; prints the result's
# bytes (hex) from process 0 so the runs can be compared bit for bit.
_CODE = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from pallax.collectives import collective_matmul

mesh = Mesh(np.asarray(jax.devices()).reshape(4), ("x",), axis_types=(AxisType.Auto,))
rng = np.random.default_rng(0)
x_np = rng.standard_normal((32, 16), dtype=np.float32)
w_np = rng.standard_normal((16, 24), dtype=np.float32)

def put(a, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

results = {}
for kind, bidi in [("all_gather", False), ("all_gather", True), ("reduce_scatter", False)]:
    xs, ws = (P("x", None), P(None, "x")) if kind == "all_gather" else (P(None, "x"), P("x", None))
    x, w = put(x_np, xs), put(w_np, ws)
    f = jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(collective_matmul(x, w, mesh=mesh, axis="x", kind=kind,
                                               bidirectional=bidi) ** 2), argnums=(0, 1)))
    loss, (dx, dw) = f(x, w)
    host = [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in (dx, dw)]
    results[f"{kind}-{bidi}"] = [float(loss)] + [h.tobytes().hex() for h in host]
    ref = np.sum((x_np @ w_np) ** 2)
    assert abs(float(loss) - ref) <= 1e-4 * abs(ref), (kind, bidi, float(loss), ref)
if jax.process_index() == 0:
    print(json.dumps(results))
"""


def test_two_processes_give_the_same_numbers_as_one():
    single = json.loads(run_with_cpu_devices(_CODE, num_devices=4).strip().splitlines()[-1])
    outputs = run_processes(_CODE, num_processes=2, devices_per_process=2)
    multi = json.loads(outputs[0].strip().splitlines()[-1])
    assert multi == single
