"""Benchmark suites.

Each suite module has ``cases(size) -> list[Case]`` (timed) and may have
``report(size) -> list[dict]`` (untimed rows: predictions, analyses). Sizes:
'smoke' (tests), 'cpu' (this machine), 'full' (an accelerator).
"""

from pallax.bench.suites import attention, collectives, decode, fused, model, rms_norm

SUITES = {
    "attention": attention,
    "collectives": collectives,
    "decode": decode,
    "fused": fused,
    "model": model,
    "rms_norm": rms_norm,
}
