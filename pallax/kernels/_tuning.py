"""Tuned block sizes stored as data, keyed by device kind.

Each op folder may hold ``tuned_block_sizes.json``::

    {"<implementation>": {"<device kind prefix>": {"<field>": value, ...}}}

A device kind matches an entry when it starts with the entry's key
("NVIDIA H100" matches "NVIDIA H100 80GB HBM3"); the longest key wins. Ops fall
back to a heuristic when nothing matches.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any


@functools.cache
def _load(path: str) -> dict[str, dict[str, dict[str, Any]]]:
    file = pathlib.Path(path)
    if not file.exists():
        return {}
    return json.loads(file.read_text())


def lookup(op_dir: pathlib.Path, implementation: str, device_kind: str | None) -> dict[str, Any]:
    """The tuned fields for ``implementation`` on ``device_kind``, or {} when none are stored."""
    if device_kind is None:
        return {}
    table = _load(str(op_dir / "tuned_block_sizes.json")).get(implementation, {})
    matches = [key for key in table if device_kind.startswith(key)]
    return dict(table[max(matches, key=len)]) if matches else {}
