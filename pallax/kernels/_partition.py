"""Running a kernel once per shard under ``jax.jit``, whatever the inputs' sharding.

A Mosaic kernel is an opaque custom call: XLA cannot partition it ("Mosaic
kernels cannot be automatically partitioned"). :func:`per_shard` wraps one
kernel call so that it is partitioned by the kernel's own rule, in the first of
these that applies:

1. inside a ``shard_map`` over every mesh axis (or on one device): the kernel is
   simply called;
2. operands on a mesh with Explicit axes: ``jax.shard_map`` with specs read from
   the operands' types;
3. a context mesh (``jax.set_mesh``) with Auto axes and a kernel *layout*
   (:func:`kernel_layout`, e.g. ``pallax.sharding.kernel_layout(rules)``: factor
   -> mesh axes from the logical-axis rule table): ``jax.shard_map`` with those
   specs; operands laid out otherwise are resharded to them at the boundary;
4. otherwise (GSPMD decides the shardings after tracing):
   ``jax.experimental.custom_partitioning`` with an einsum-like sharding rule; the
   partition callback reads the shardings the partitioner chose and runs the
   kernel on the local shards. Not for Mosaic TPU kernels: libtpu has no emitter
   for custom-partitioned calls (jax-ml/jax#38196, "Custom emitter for
   CustomSPMDPartitioning not found"), so on TPU a kernel without a layout is
   called as is and a sharded operand gets XLA's "wrap the call in a shard_map".

Every operand dimension is labelled with a *factor* ("b t n h" for queries). Both
paths make one plan: each factor is sharded like the operand that shards it most
(the others are sliced to match: no gather); the ``unshardable`` factors (a
sequence axis the kernel walks, a contracted head_dim) must not be sharded — a
clear ValueError names the operand, the dimension and the mesh axes; a result
that lacks a sharded factor (dK/dV lack the query heads of a group; a bias's
gradient lacks the batch it was broadcast over) is summed over that factor's axes.
The query-heads factor ``n`` and the key/value-heads factor ``k`` are linked:
with one K/V head (multi-query) K is replicated and each shard holds some of the
queries; otherwise K is split with N, and must divide the axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from pallax.kernels._dispatch import InterpretConfig, hlo_interpreter

Axes = tuple[str, ...]
# The logical name of each factor label, for layouts from a logical-axis rule table.
# Rows: the first leading dimension is the batch ("r", "r0"), the second the sequence.
FACTOR_LOGICAL = {
    "b": "batch",
    "r": "batch",
    "r0": "batch",
    "r1": "length",
    "t": "length",
    "s": "length",
    "n": "heads",
    "k": "kv_heads",
    "g": None,
    "h": "head_dim",
    "d": "act_embed",
    "f": "mlp",
    "v": "vocab",
}
Layout = Callable[[str], Axes]  # logical name -> mesh axes of the context mesh
_layout: contextvars.ContextVar[Layout | None] = contextvars.ContextVar(
    "pallax_kernel_layout", default=None
)


@contextlib.contextmanager
def kernel_layout(layout: Layout) -> Iterator[None]:
    """Kernels traced inside the block, under a context mesh with Auto axes, run per
    shard with each factor sharded over ``layout(FACTOR_LOGICAL[factor])``."""
    token = _layout.set(layout)
    try:
        yield
    finally:
        _layout.reset(token)


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a kernel's operands and results are labelled.

    operands / results: one label string per array ("b t n h"); "." marks a
      dimension of size 1 (a broadcast) that is never sharded.
    names: the operands' names, for messages.
    unshardable: factor -> what it is ("t": "the query sequence").
    followers: operands (small ones: lengths, a norm's scale) whose own sharding is
      not consulted: they are resliced or gathered to the plan.
    combined: factors whose sharded partial results the kernel function combines
      itself; others are summed automatically.
    with_plan: call the kernel function with ``plan=`` (factor -> mesh axes of this
      call; always with ``combined``).
    tied: (factor, leader) pairs: the factor is sharded exactly like its leader
      (a paged cache's page pool with the batch), whatever its operand says.
    """

    op: str
    operands: tuple[str, ...]
    results: tuple[str, ...]
    names: tuple[str, ...]
    unshardable: tuple[tuple[str, str], ...] = ()
    followers: tuple[str, ...] = ()
    combined: tuple[str, ...] = ()
    with_plan: bool = False
    tied: tuple[tuple[str, str], ...] = ()

    def call(self, fn: Callable, operands, plan: dict[str, Axes]):
        if self.combined or self.with_plan:
            return tuple(fn(*operands, plan=plan))
        return tuple(fn(*operands))


def _axes(entry) -> Axes:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _labels(text: str) -> list[str]:
    return text.split()


def plan(rule: Rule, specs: Sequence[PartitionSpec], shapes, mesh_shape) -> dict[str, Axes]:
    """factor -> mesh axes, from the operands' partition specs (see the module doc)."""
    size = lambda axes: math.prod(mesh_shape[a] for a in axes)
    unshardable = dict(rule.unshardable)
    tied = dict(rule.tied)
    chosen: dict[str, Axes] = {}
    dims: dict[str, int] = {}
    for name, labels, spec, shape in zip(rule.names, rule.operands, specs, shapes, strict=True):
        if name in rule.followers:
            continue
        padded = tuple(spec) + (None,) * (len(shape) - len(spec))
        for i, (factor, entry, dim) in enumerate(zip(_labels(labels), padded, shape, strict=True)):
            axes = _axes(entry)
            if factor == "." or dim == 1:
                continue
            dims[factor] = dim
            if axes and factor in unshardable:
                raise ValueError(
                    f"{rule.op}: {name} dimension {i} ({unshardable[factor]}, size {dim}) is "
                    f"sharded over mesh axes {axes}; the kernel needs it whole on each device "
                    f"(shard the batch or the heads instead, or replicate it: "
                    f"{name}.sharding={spec})"
                )
            current = chosen.get(factor, ())
            # the most devices wins; a size-1 axis still beats none (Explicit types keep it)
            if factor not in tied and (size(axes) > size(current) or (axes and not current)):
                chosen[factor] = axes
    if "n" in dims or "k" in dims:
        n_axes, k_axes = chosen.get("n", ()), chosen.get("k", ())
        heads = n_axes if size(n_axes) >= size(k_axes) else k_axes
        k = dims.get("k", 1)
        if k > 1 and heads and k % size(heads):
            raise ValueError(
                f"{rule.op}: {k} key/value heads cannot be split over mesh axes {heads} "
                f"(size {size(heads)}) like the query heads; use a head count divisible by the "
                "axes, or shard the query heads over fewer devices"
            )
        chosen["n"] = heads
        chosen["k"] = heads if k > 1 else ()
        chosen["g"] = heads if k == 1 else ()
    for factor, leader in rule.tied:
        axes = chosen.get(leader, ())
        if factor in dims and axes and dims[factor] % size(axes):
            raise ValueError(
                f"{rule.op}: dimension '{factor}' (size {dims[factor]}) must split over mesh "
                f"axes {axes} with '{leader}', and their size {size(axes)} does not divide it"
            )
        chosen[factor] = axes if factor in dims else ()
    return chosen


def _spec(labels: str, chosen: dict[str, Axes]) -> PartitionSpec:
    entries = []
    for factor in _labels(labels):
        axes = chosen.get(factor, ()) if factor != "." else ()
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def _reduced_axes(rule: Rule, chosen: dict[str, Axes]) -> list[Axes]:
    """Per result: the mesh axes of sharded operand factors the result lacks, minus the
    axes its own factors are sharded over (those split the result, not a sum: the
    query heads n = (k, g), a page pool tied to the batch)."""
    operand_factors = {f for labels in rule.operands for f in _labels(labels)}
    out = []
    for labels in rule.results:
        have = set(_labels(labels)) - {"."}
        covered = {a for f in have for a in chosen.get(f, ())}
        missing = operand_factors - have - {"."} - set(rule.combined)
        axes = [a for f in sorted(missing) for a in chosen.get(f, ()) if a not in covered]
        out.append(tuple(dict.fromkeys(axes)))
    return out


def _local(fn: Callable, rule: Rule, chosen: dict[str, Axes]) -> Callable:
    reduced = _reduced_axes(rule, chosen)

    def run(*operands):
        with hlo_interpreter():
            results = rule.call(fn, operands, chosen)
        return tuple(
            jax.lax.psum(r, axes) if axes else r for r, axes in zip(results, reduced, strict=True)
        )

    return run


def _explicit_mesh(operands):
    for x in operands:
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and not mesh.empty and mesh.are_all_axes_explicit:
            return mesh
    return None


def like_operands(results, operands) -> tuple:
    """Gradients typed like their primal operands on Explicit meshes (a custom_vjp
    backward must return exactly the operands' types); unchanged otherwise."""
    return tuple(_like(r, x) for r, x in zip(results, operands, strict=True))


def _like(result, operand):
    if result is None or operand is None:
        return result
    sharding = getattr(jax.typeof(operand), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not mesh.are_all_axes_explicit:
        return result
    if jax.typeof(result).sharding.spec == sharding.spec:
        return result
    return jax.sharding.reshard(result, sharding)


def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def _fully_manual(mesh) -> bool:
    return mesh is not None and set(mesh.manual_axes) == set(mesh.axis_names)


def _layout_specs(rule: Rule, operands, mesh, layout: Layout) -> list[PartitionSpec]:
    """Each operand's spec under ``layout`` (a factor whose dimension its axes do not
    divide stays whole)."""
    specs = []
    for labels, x in zip(rule.operands, operands, strict=True):
        entries = []
        for factor, dim in zip(_labels(labels), x.shape, strict=True):
            logical = FACTOR_LOGICAL.get(factor)
            axes = tuple(a for a in layout(logical) if mesh.shape.get(a, 1) > 1) if logical else ()
            if axes and dim % math.prod(mesh.shape[a] for a in axes):
                axes = ()
            entries.append(axes or None)
        specs.append(PartitionSpec(*entries))
    return specs


def _shard_map(fn, rule: Rule, operands, chosen, mesh):
    return jax.shard_map(
        _local(fn, rule, chosen),
        mesh=mesh,
        in_specs=tuple(_spec(labels, chosen) for labels in rule.operands),
        out_specs=tuple(_spec(labels, chosen) for labels in rule.results),
        check_vma=False,
    )(*operands)


def per_shard(
    fn: Callable,
    rule: Rule,
    *operands,
    interpret: InterpretConfig | None = None,
    gpu=False,
    tpu=False,
) -> tuple:
    """``fn(*operands)`` (a tuple of arrays) run on each device's shards (module doc).

    Interpreted kernels (``interpret`` set) run in Pallas's HLO interpreter, which a
    partitioner can place; the TPU interpreter's race detector and the Mosaic GPU
    interpreter need host callbacks that cannot run inside a partitioned call, so
    those kernels are called unpartitioned (GSPMD partitions their HLO as any other).
    """
    context = _context_mesh()
    if (interpret is not None and (gpu or interpret.detect_races)) or _fully_manual(context):
        return rule.call(fn, operands, {})
    shapes = [x.shape for x in operands]
    mesh = _explicit_mesh(operands)
    if mesh is not None:
        specs = [jax.typeof(x).sharding.spec for x in operands]
        chosen = plan(rule, specs, shapes, dict(mesh.shape))
        # Explicit types must match the specs: followers and less-sharded operands are
        # resharded to the plan (slicing; a follower may be gathered).
        operands = [
            jax.sharding.reshard(x, NamedSharding(mesh, _spec(labels, chosen)))
            for x, labels in zip(operands, rule.operands, strict=True)
        ]
        return _shard_map(fn, rule, operands, chosen, mesh)
    layout = _layout.get()
    if context is not None and layout is not None:
        specs = _layout_specs(rule, operands, context, layout)
        chosen = plan(rule, specs, shapes, dict(context.shape))
        return _shard_map(fn, rule, operands, chosen, context)
    if tpu and interpret is None:  # jax-ml/jax#38196: no custom partitioning on TPU
        return rule.call(fn, operands, {})
    return _partitioned(fn, rule)(*operands)


def _partitioned(fn: Callable, rule: Rule):
    def traced(*xs):  # the unpartitioned call (shapes, one device): nothing is split
        with hlo_interpreter():
            return rule.call(fn, xs, {})

    wrapped = custom_partitioning(traced)

    def decide(mesh, arg_shapes):
        specs = [_spec_of(a.sharding, len(a.shape)) for a in arg_shapes]
        chosen = plan(rule, specs, [a.shape for a in arg_shapes], dict(mesh.shape))
        args = tuple(NamedSharding(mesh, _spec(labels, chosen)) for labels in rule.operands)
        outs = tuple(NamedSharding(mesh, _spec(labels, chosen)) for labels in rule.results)
        return chosen, args, outs

    def partition(mesh, arg_shapes, result_shape):
        chosen, args, outs = decide(mesh, arg_shapes)
        return mesh, _local(fn, rule, chosen), outs, args

    def infer(mesh, arg_shapes, result_shape):
        return decide(mesh, arg_shapes)[2]

    text = ", ".join(_rule_labels(rule.operands)) + " -> " + ", ".join(_rule_labels(rule.results))
    wrapped.def_partition(
        partition=partition, infer_sharding_from_operands=infer, sharding_rule=text
    )
    return wrapped


def _rule_labels(labels: Sequence[str]) -> list[str]:
    """Shardy's rule: every '.' becomes its own size-1 factor."""
    out, count = [], 0
    for text in labels:
        parts = []
        for factor in _labels(text):
            if factor == ".":
                count += 1
                factor = f"unit{count}"
            parts.append(factor)
        out.append(" ".join(parts))
    return out


def _spec_of(sharding, ndim: int) -> PartitionSpec:
    if isinstance(sharding, NamedSharding):
        return sharding.spec
    return PartitionSpec(*([None] * ndim))
