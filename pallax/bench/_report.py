"""Terminal table, JSON and roofline plot of benchmark results."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence

import jax

from pallax.bench._harness import Result
from pallax.bench._roofline import Peaks


def print_table(results: Sequence[Result], peaks: Peaks) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"pallax benchmarks on {peaks.device}",
        caption=(
            f"peaks: {peaks.flops_per_s / 1e12:.3g} TFLOP/s, {peaks.bytes_per_s / 1e9:.3g} GB/s "
            f"({peaks.source}); roofline = fraction of the bound the device allows"
        ),
    )
    for column in ("suite", "case", "implementation", "median", "TFLOP/s", "GB/s", "roofline"):
        table.add_column(
            column, justify="left" if column in ("suite", "case", "implementation") else "right"
        )
    for r in results:
        if r.error:
            table.add_row(
                r.suite,
                r.name,
                escape(r.implementation),
                "-",
                "-",
                "-",
                f"[red]{escape(r.error[:60])}",
            )
            continue
        table.add_row(
            r.suite,
            r.name,
            escape(r.implementation),
            f"{r.median_s * 1e3:.3f} ms",
            f"{r.flops_per_s / 1e12:.3f}",
            f"{r.bytes_per_s / 1e9:.1f}",
            f"{100 * r.roofline_fraction:.1f}%",
        )
    Console(width=160).print(table)


def print_rows(title: str, rows: Sequence[dict]) -> None:
    """Untimed rows of a suite (predictions, analyses), grouped by their set of keys."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row), []).append(row)
    console = Console(width=160)
    for keys, group in groups.items():
        table = Table(title=title)
        for key in keys:
            table.add_column(key)
        for row in group:
            table.add_row(*(escape(_fmt(row[k])) for k in keys))
        console.print(table)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_json(
    path: str | pathlib.Path,
    results: Sequence[Result],
    peaks: Peaks,
    reports: dict[str, list[dict]] | None = None,
) -> None:
    payload = {
        "device": peaks.device,
        "platform": jax.devices()[0].platform,
        "jax_version": jax.__version__,
        "peaks": dataclasses.asdict(peaks),
        "results": [dataclasses.asdict(r) for r in results],
        "reports": reports or {},
    }
    pathlib.Path(path).write_text(json.dumps(payload, indent=2, default=_nan_to_none))


def _nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def plot_roofline(path: str | pathlib.Path, results: Sequence[Result], peaks: Peaks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if not r.error]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lo = min([r.intensity for r in ok] + [0.1]) / 2
    hi = max([r.intensity for r in ok] + [peaks.flops_per_s / peaks.bytes_per_s]) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peaks.flops_per_s, x * peaks.bytes_per_s) for x in xs], "k-", label="roofline")
    by_implementation: dict[str, list[Result]] = {}
    for r in ok:
        by_implementation.setdefault(r.implementation, []).append(r)
    markers = "osD^v<>p*h"
    for i, (implementation, group) in enumerate(by_implementation.items()):
        ax.scatter(
            [r.intensity for r in group],
            [r.flops_per_s for r in group],
            marker=markers[i % len(markers)],
            alpha=0.8,
            label=implementation,
        )
    ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"pallax roofline — {peaks.device}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
