"""Ahead-of-time compilation for TPU and Hopper on a machine that has neither.

``jax.export`` stops at StableHLO; the Mosaic TPU compiler (in libtpu) and the
Mosaic GPU pipeline (LLVM, ptxas) only run at ``.compile()``. Both can run here
against *compile-only* devices: ``jax.experimental.topologies`` describes a TPU
slice (from libtpu, ``pip install 'jax[tpu]'``) or a Hopper GPU (from the CUDA
plugin and a target description, ``pip install jax-cuda12-plugin jax-cuda12-pjrt
nvidia-cuda-nvcc-cu12``), and ``jax.jit(f).lower(...).compile()`` then runs the
real compilers: VMEM/SMEM overflows, layout-inference failures and register
spills show up as they would on the hardware. Nothing is executed.

Both need JAX on its CPU backend alone (``JAX_PLATFORMS=cpu``, which the first
call selects if JAX has not started yet): the CUDA plugin will not describe a GPU
it cannot load otherwise.

    from pallax.testing import compile_for, tpu_mesh
    result = compile_for("v5e", f, jax.ShapeDtypeStruct((1, 2048, 8, 128), jnp.bfloat16), ...)
    print(result.summary())          # compiled or the compiler's message; bytes; registers
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from pallax.kernels import lowering_platform


@dataclasses.dataclass(frozen=True)
class TpuChip:
    """A TPU generation as libtpu's topology API names it."""

    prefix: str  # topology name prefix: "v5e" -> "v5e:2x2"
    chip_config: str  # "default", or "megacore" (two TensorCores as one device)
    shapes: dict  # chips -> topology shape


TPU_CHIPS: dict[str, TpuChip] = {
    "v4": TpuChip("v4", "megacore", {4: "2x2x1", 8: "2x2x2", 16: "2x2x4"}),
    "v5e": TpuChip("v5e", "default", {4: "2x2", 8: "2x4", 16: "4x4"}),
    "v5p": TpuChip("v5", "megacore", {4: "2x2x1", 8: "2x2x2", 16: "2x2x4"}),
    "v6e": TpuChip("v6e", "default", {4: "2x2", 8: "2x4", 16: "4x4"}),
}

# GpuTargetConfigProto text: the fields XLA and Mosaic GPU read when compiling
# without a device (values from the H100 SXM / H200 SXM data sheets).
_HOPPER = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{name}"
"""
GPU_TARGETS: dict[str, str] = {
    "h100": _HOPPER.format(
        bandwidth=3_352_320_000_000, memory=84_942_979_072, name="NVIDIA H100 80GB HBM3"
    ),
    "h200": _HOPPER.format(bandwidth=4_800_000_000_000, memory=150_754_820_096, name="NVIDIA H200"),
}
# Dynamic shared memory one CTA may use on sm_90 (227 KiB).
HOPPER_SMEM_BYTES = 232_448
TARGETS: tuple[str, ...] = (*TPU_CHIPS, *GPU_TARGETS)


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What ptxas and Mosaic GPU report for one compiled kernel."""

    name: str
    registers: int
    spill_bytes: int  # spill stores + spill loads
    smem_bytes: int  # dynamic shared memory (Mosaic GPU scratch)


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """The outcome of one ahead-of-time compile (per chip; bytes from ``memory_analysis``)."""

    target: str
    ok: bool
    seconds: float
    error: str | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    alias_bytes: int | None = None  # outputs that reuse donated arguments
    kernels: tuple[KernelResources, ...] = ()

    @property
    def total_bytes(self) -> int | None:
        """Peak bytes per chip: arguments + outputs + temporaries - donated aliases."""
        if self.argument_bytes is None:
            return None
        return self.argument_bytes + self.output_bytes + self.temp_bytes - (self.alias_bytes or 0)

    def summary(self) -> str:
        if not self.ok:
            return f"{self.target}: FAILED after {self.seconds:.1f}s: {first_lines(self.error)}"
        mib = (self.total_bytes or 0) / 2**20
        text = f"{self.target}: compiled in {self.seconds:.1f}s, {mib:.1f} MiB per chip"
        for k in self.kernels:
            text += (
                f"; {k.name}: {k.registers} registers, {k.spill_bytes} spill bytes, "
                f"{k.smem_bytes} B SMEM"
            )
        return text


def first_lines(message: str | None, n: int = 3) -> str:
    lines = [line for line in (message or "").splitlines() if line.strip()]
    return " | ".join(lines[:n])


def _require_cpu_only() -> None:
    """Compile-only devices need JAX on its CPU backend alone (the CUDA plugin does not
    describe a GPU it cannot load otherwise): selects it if JAX has not started yet."""
    from jax._src import xla_bridge

    if jax.config.jax_platforms == "cpu":
        return
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        return
    raise RuntimeError(
        "compile-only TPU/GPU targets need JAX_PLATFORMS=cpu (set before JAX starts; "
        f"this process started JAX with platforms={jax.config.jax_platforms!r})"
    )


@functools.cache
def compile_only_devices(target: str, *, chips: int = 4) -> tuple:
    """Compile-only devices of ``target`` ('v4', 'v5e', 'v5p', 'v6e', 'h100', 'h200').

    TPU targets describe a slice of ``chips`` chips (4, 8 or 16); GPU targets one GPU.
    """
    from jax.experimental import topologies

    _require_cpu_only()
    if target in GPU_TARGETS:
        _put_ptxas_on_path()
        topo = topologies.get_topology_desc(
            platform="cuda", topology="1x1x1", target_config=GPU_TARGETS[target]
        )
        return tuple(topo.devices)
    if target not in TPU_CHIPS:
        raise ValueError(f"unknown compile target {target!r}; expected one of {TARGETS}")
    chip = TPU_CHIPS[target]
    if chips not in chip.shapes:
        raise ValueError(f"{target}: chips must be one of {sorted(chip.shapes)}, got {chips}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    _load_tpu_plugin()
    topo = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{chip.prefix}:{chip.shapes[chips]}",
        chip_config_name=chip.chip_config,
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
        wrap=(False, False, False),
    )
    return tuple(topo.devices)


def _load_tpu_plugin() -> None:
    """Loads libtpu's PJRT plugin and runs JAX's plugin callbacks on it (they register,
    among others, the custom_partitioning partitioner: without it, compiling a kernel
    that partitions itself fails with "Custom emitter for CustomSPMDPartitioning not
    found"). JAX's own topology path loads the plugin without them (private API)."""
    from jax._src import xla_bridge
    from jax._src.lib import xla_client

    if xla_client.pjrt_plugin_loaded("tpu"):
        return
    # Compile-only use takes no chip: let several processes load libtpu (its lockfile
    # would otherwise refuse a second one, e.g. a report beside the test suite).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    path = xla_bridge.get_tpu_library_path()
    if path is None:
        raise RuntimeError("no libtpu: pip install 'jax[tpu]' (the `compile` extra)")
    c_api = xla_client.load_pjrt_plugin_dynamically("tpu", path)
    for callback in list(xla_bridge._plugin_callbacks):
        callback(c_api=c_api)


def target_mesh(target: str, axes: dict[str, int], **mesh_kwargs) -> jax.sharding.Mesh:
    """A Mesh over ``prod(axes)`` compile-only devices of ``target``, e.g.
    ``target_mesh('v5e', {'data': 2, 'fsdp': 2, 'tensor': 2})`` (a v5e-8 slice)."""
    chips = int(np.prod(list(axes.values())))
    devices = compile_only_devices(target, chips=chips) if target in TPU_CHIPS else None
    if devices is None:
        devices = compile_only_devices(target)
    if len(devices) != chips:
        raise ValueError(f"{target}: {len(devices)} devices, mesh {axes} needs {chips}")
    grid = np.array(devices).reshape(tuple(axes.values()))
    return jax.sharding.Mesh(grid, tuple(axes), **mesh_kwargs)


def _put_ptxas_on_path() -> None:
    """Mosaic GPU runs ``ptxas`` from PATH; prefer the one of the nvidia-cuda-nvcc wheel."""
    try:
        import nvidia.cuda_nvcc as nvcc
    except ImportError:
        nvcc = None
    if nvcc is not None:
        bin_dir = pathlib.Path(next(iter(nvcc.__path__))) / "bin"
        if (bin_dir / "ptxas").exists() and not os.environ["PATH"].startswith(str(bin_dir)):
            os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    if shutil.which("ptxas") is None:
        raise RuntimeError("no ptxas: pip install nvidia-cuda-nvcc-cu12 (or put CUDA on PATH)")


def _placed(args: Sequence, device) -> list:
    """Arguments (pytrees) as ShapeDtypeStructs; leaves without a sharding go on ``device``."""
    single = jax.sharding.SingleDeviceSharding(device)

    def place(x):
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, jax.sharding.NamedSharding | jax.sharding.SingleDeviceSharding):
            sharding = single
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return [jax.tree.map(place, x) for x in args]


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"smem_scratch_bytes=(\d+)")


def _kernel_reports(dump: pathlib.Path) -> tuple[KernelResources, ...]:
    kernels = []
    for ptxas in sorted(dump.glob("*.ptxas")):
        text = ptxas.read_text()
        resources = ptxas.with_suffix(".resources.txt")
        smem = _SMEM.search(resources.read_text()) if resources.exists() else None
        regs = _PTXAS_REGS.search(text)
        spills = _PTXAS_SPILL.findall(text)
        kernels.append(
            KernelResources(
                name=ptxas.stem,
                registers=int(regs.group(1)) if regs else -1,
                spill_bytes=sum(int(a) + int(b) for a, b in spills),
                smem_bytes=int(smem.group(1)) if smem else -1,
            )
        )
    return tuple(kernels)


def compile_for(
    target: str, fn: Callable, *args, chips: int = 4, donate_argnums: tuple[int, ...] = ()
) -> CompileResult:
    """Compiles ``jax.jit(fn)(*args)`` for ``target`` with the real compiler.

    ``args`` are arrays or ShapeDtypeStructs (None passes through); those with a
    NamedSharding on a :func:`target_mesh` keep it, the others live on one chip.
    Kernels are traced for the target (``lowering_platform`` with its device kind),
    so an explicit ``implementation='pallas_tpu'`` compiles from a CPU host.
    ``donate_argnums`` as for ``jax.jit`` (a jitted ``fn``'s own donation does not
    carry through the wrapper). Compiler errors are returned (``ok=False``), not raised.
    """
    devices = compile_only_devices(target, **({"chips": chips} if target in TPU_CHIPS else {}))
    platform = "cuda" if target in GPU_TARGETS else "tpu"
    placed = _placed(args, devices[0])

    def fresh(*a):  # a new function: jit's trace cache must not reuse another target's
        return fn(*a)

    dump = pathlib.Path(tempfile.mkdtemp(prefix="pallax-mgpu-")) if platform == "cuda" else None
    saved = os.environ.get("MOSAIC_GPU_DUMP_TO")
    start = time.perf_counter()
    try:
        if dump is not None:
            os.environ["MOSAIC_GPU_DUMP_TO"] = str(dump)
            jax.clear_caches()  # a cached executable would leave no ptxas report
        with lowering_platform(platform, device_kind=devices[0].device_kind):
            compiled = jax.jit(fresh, donate_argnums=donate_argnums).lower(*placed).compile()
        stats = compiled.memory_analysis()
        return CompileResult(
            target=target,
            ok=True,
            seconds=time.perf_counter() - start,
            argument_bytes=stats.argument_size_in_bytes,
            output_bytes=stats.output_size_in_bytes,
            temp_bytes=stats.temp_size_in_bytes,
            alias_bytes=stats.alias_size_in_bytes,
            kernels=_kernel_reports(dump) if dump is not None else (),
        )
    except Exception as e:  # the compiler's own message is the result
        return CompileResult(
            target, ok=False, seconds=time.perf_counter() - start, error=f"{type(e).__name__}: {e}"
        )
    finally:
        if dump is not None:
            if saved is None:
                os.environ.pop("MOSAIC_GPU_DUMP_TO", None)
            else:
                os.environ["MOSAIC_GPU_DUMP_TO"] = saved
            shutil.rmtree(dump, ignore_errors=True)


def assert_compiles(
    target: str,
    fn: Callable,
    *args,
    chips: int = 4,
    donate_argnums: tuple[int, ...] = (),
    what: str | None = None,
) -> CompileResult:
    """:func:`compile_for`, raising AssertionError with the compiler's message on failure,
    and on Hopper also when a kernel spills registers or exceeds 227 KiB of SMEM.

    ``what`` names the case in the message (default: ``fn``'s name and the shapes).
    """
    result = compile_for(target, fn, *args, chips=chips, donate_argnums=donate_argnums)
    if what is None:
        shapes = ", ".join("None" if a is None else f"{a.dtype}{list(a.shape)}" for a in args)
        what = f"{getattr(fn, '__name__', fn)}({shapes})"
    if not result.ok:
        raise AssertionError(f"{what} does not compile for {target}:\n{result.error}")
    for k in result.kernels:
        if k.spill_bytes or k.smem_bytes > HOPPER_SMEM_BYTES:
            raise AssertionError(
                f"{what} on {target}: kernel {k.name} spills or overflows SMEM "
                f"({k.registers} registers, {k.spill_bytes} spill bytes, "
                f"{k.smem_bytes} B SMEM > {HOPPER_SMEM_BYTES})"
            )
    return result
