"""Which matmuls each collective of a compiled program can overlap with.

A collective can run behind a dot only if neither depends on the other. This
reads the optimised HLO text (``jax.jit(f).lower(...).compile().as_text()``),
builds each computation's dependency graph, and lists for every collective the
dots that are neither its ancestors nor its descendants. That is what a
scheduler needs to overlap them; whether a given backend's scheduler then does
is visible in its scheduled HLO (async ``*-start``/``*-done`` pairs bracketing
the dots).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

_COLLECTIVES = {
    "all-gather",
    "all-gather-start",
    "reduce-scatter",
    "all-reduce",
    "all-reduce-start",
    "collective-permute",
    "collective-permute-start",
    "all-to-all",
    "ragged-all-to-all",
}
_MATMULS = {"dot", "convolution", "ragged-dot"}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    opcode: str
    shape: str
    operands: tuple[str, ...]
    called: tuple[str, ...]
    attributes: str


@dataclasses.dataclass(frozen=True)
class CollectiveOverlap:
    name: str
    opcode: str
    shape: str
    computation: str
    independent_dots: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OverlapReport:
    collectives: tuple[CollectiveOverlap, ...]
    dots: tuple[str, ...]

    @property
    def num_overlappable(self) -> int:
        return sum(bool(c.independent_dots) for c in self.collectives)

    def __str__(self) -> str:
        lines = [
            f"{len(self.collectives)} collectives, {len(self.dots)} dots, "
            f"{self.num_overlappable} collectives with independent dots"
        ]
        for c in self.collectives:
            dots = ", ".join(c.independent_dots[:4]) + (
                " ..." if len(c.independent_dots) > 4 else ""
            )
            lines.append(
                f"  {c.opcode:<26} {c.name:<28} {c.shape:<22} "
                f"{len(c.independent_dots):>3} independent dots  {dots}"
            )
        return "\n".join(lines)


def _split_shape(rest: str) -> tuple[str, str]:
    """'f32[8]{0} dot(...)' -> ('f32[8]{0}', 'dot(...)'); tuple shapes are parenthesised."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _parse(text: str) -> dict[str, dict[str, _Instruction]]:
    computations: dict[str, dict[str, _Instruction]] = {}
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(2), {})
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line) if current is not None else None
        if not match:
            continue
        name, rest = match.groups()
        shape, tail = _split_shape(rest)
        opcode, paren, args = tail.partition("(")
        if not paren:
            continue
        depth, end = 1, len(args)
        for i, ch in enumerate(args):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                end = i
                break
        operands, attributes = args[:end], args[end + 1 :]
        current[name] = _Instruction(
            name=name,
            opcode=opcode.strip(),
            shape=shape,
            operands=tuple(_NAME.findall(operands)),
            called=tuple(_NAME.findall(attributes)),
            attributes=attributes,
        )
    return computations


def _contains(computations, name: str, predicate, seen=None) -> bool:
    seen = set() if seen is None else seen
    if name in seen or name not in computations:
        return False
    seen.add(name)
    return any(
        predicate(inst) or any(_contains(computations, c, predicate, seen) for c in inst.called)
        for inst in computations[name].values()
    )


def _is_matmul(inst: _Instruction) -> bool:
    if inst.opcode in _MATMULS:
        return True
    return inst.opcode == "custom-call" and re.search(r"matmul|gemm", inst.attributes, re.I)


def _reach(start: str, edges: dict[str, list[str]]) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def overlap_report(compiled_or_hlo_text: Any) -> OverlapReport:
    """Lists, for each collective in a compiled program, the dots it could overlap with.

    Accepts HLO text, a ``jax.stages.Compiled``, or a ``jax.stages.Lowered``
    (compiled here). Fusions and calls that contain a dot count as dots;
    async collectives are reported once, at their ``*-start``.
    """
    if hasattr(compiled_or_hlo_text, "compile"):
        compiled_or_hlo_text = compiled_or_hlo_text.compile()
    text = (
        compiled_or_hlo_text
        if isinstance(compiled_or_hlo_text, str)
        else (compiled_or_hlo_text.as_text())
    )
    computations = _parse(text)
    is_collective = lambda inst: inst.opcode in _COLLECTIVES
    collectives, all_dots = [], []
    for comp_name, insts in computations.items():
        dots = [
            i.name
            for i in insts.values()
            if _is_matmul(i)
            or (
                i.opcode in ("fusion", "call")
                and any(_contains(computations, c, _is_matmul) for c in i.called)
            )
        ]
        all_dots += dots
        operands = {i.name: [o for o in i.operands if o in insts] for i in insts.values()}
        users: dict[str, list[str]] = {}
        for name, ops in operands.items():
            for o in ops:
                users.setdefault(o, []).append(name)
        for inst in insts.values():
            wrapped = inst.opcode == "async-start" and any(
                _contains(computations, c, is_collective) for c in inst.called
            )
            if not (is_collective(inst) or wrapped):
                continue
            related = _reach(inst.name, operands) | _reach(inst.name, users)
            collectives.append(
                CollectiveOverlap(
                    name=inst.name,
                    opcode=inst.opcode,
                    shape=inst.shape,
                    computation=comp_name,
                    independent_dots=tuple(d for d in dots if d not in related),
                )
            )
    return OverlapReport(tuple(collectives), tuple(all_dots))


def bracketed_dots(scheduled_hlo_text: str) -> dict[str, int]:
    """For each async collective ``*-start`` in a scheduled module, the number of dots
    the schedule places between it and its ``*-done``.

    In a scheduled module (``is_scheduled=true``, as ``Compiled.as_text()`` prints
    on GPU and TPU) instruction order is execution order, so a dot between a
    start and its done runs while the transfer is in flight.
    """
    computations = _parse(scheduled_hlo_text)
    out: dict[str, int] = {}
    for insts in computations.values():
        order = list(insts.values())
        is_dot = lambda i: (
            _is_matmul(i)
            or (
                i.opcode in ("fusion", "call")
                and any(_contains(computations, c, _is_matmul) for c in i.called)
            )
        )
        open_starts: dict[str, int] = {}
        for inst in order:
            if inst.opcode.endswith("-start") or inst.opcode == "async-start":
                open_starts[inst.name] = 0
            elif inst.opcode.endswith("-done") or inst.opcode == "async-done":
                for operand in inst.operands:
                    if operand in open_starts:
                        out[operand] = open_starts.pop(operand)
            elif is_dot(inst):
                for name in open_starts:
                    open_starts[name] += 1
    return out
