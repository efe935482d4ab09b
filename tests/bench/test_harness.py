"""The benchmark harness: roofline arithmetic, the CLI's outputs."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from pallax.bench import Case, Peaks, run_case, table_peaks
from pallax.bench.__main__ import main


def _run_suite(tmp_path, suite: str, *, runs: int = 1) -> dict:
    """Runs one suite at smoke size through the CLI; returns its JSON."""
    json_path = tmp_path / "bench.json"
    args = ["--suite", suite, "--size", "smoke", "--runs", str(runs), "--warmup", "1"]
    assert main([*args, "--json", str(json_path)]) == 0
    return json.loads(json_path.read_text())


def test_roofline_time_is_the_binding_limit():
    peaks = Peaks("test", flops_per_s=100.0, bytes_per_s=10.0, source="made up")
    assert peaks.roofline_time(flops=1000, bytes_moved=10) == 10.0  # compute bound
    assert peaks.roofline_time(flops=10, bytes_moved=1000) == 100.0  # memory bound


@pytest.mark.parametrize(
    "kind, flops, bw",
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),
        ("NVIDIA H200", 989e12, 4.8e12),
        ("TPU v5 lite", 197e12, 0.819e12),
        ("TPU v5p", 459e12, 2.765e12),
        ("TPU v4", 275e12, 1.2e12),
        ("TPU v6 lite", 918e12, 1.64e12),
    ],
)
def test_peak_table_matches_datasheets(kind, flops, bw):
    peaks = table_peaks(kind)
    assert (peaks.flops_per_s, peaks.bytes_per_s) == (flops, bw)


def test_unknown_device_has_no_table_entry():
    assert table_peaks("Some Future Chip") is None


def test_run_case_reports_rates_and_fraction():
    peaks = Peaks("test", flops_per_s=1e18, bytes_per_s=1e18, source="made up")
    case = Case("s", "add", "jnp", lambda x: x + 1, (jnp.ones(1024),), flops=1024, bytes=8192)
    result = run_case(case, peaks, warmup=1, runs=3)
    assert result.error is None and result.runs == 3
    assert result.bytes_per_s == pytest.approx(8192 / result.median_s)
    assert 0 < result.roofline_fraction < 1


def test_a_failing_peer_is_reported_not_fatal():
    peaks = Peaks("test", 1.0, 1.0, "made up")

    def broken(x):
        raise RuntimeError("cudnn is not here")

    result = run_case(Case("s", "c", "cudnn", broken, (1,), 1, 1), peaks)
    assert "cudnn is not here" in result.error


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "roofline.png"
    assert (
        main(
            [
                "--suite",
                "rms_norm",
                "--size",
                "smoke",
                "--runs",
                "2",
                "--warmup",
                "1",
                "--json",
                str(json_path),
                "--plot",
                str(plot_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "pallax[xla]" in out and "roofline" in out
    payload = json.loads(json_path.read_text())
    implementations = {r["implementation"] for r in payload["results"]}
    assert implementations == {"pallax[xla]", "jnp"}
    assert all(r["error"] is None and r["roofline_fraction"] > 0 for r in payload["results"])
    assert payload["peaks"]["flops_per_s"] > 0
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collectives_suite_reports_predictions_and_overlap(tmp_path):
    payload = _run_suite(tmp_path, "collectives", runs=1)
    rows = payload["reports"]["collectives"]
    overlap = {r["schedule"]: r for r in rows if "overlappable" in r}
    assert overlap["naive all-gather then matmul"]["overlappable"] == 0
    assert overlap["ring all_gather_matmul"]["overlappable"] == 7
    predictions = [r for r in rows if "predicted_ms" in r]
    assert {r["tp"] for r in predictions} == {4, 8, 16}
    for r in predictions:
        assert r["predicted_ms"] >= max(r["compute_ms"], r["comm_ms"]) - 1e-9
    assert {r["implementation"] for r in payload["results"]} == {"naive", "ring", "ring-bidi"}


def test_fused_suite_reports_memory_next_to_the_naive_composition(tmp_path):
    payload = _run_suite(tmp_path, "fused", runs=1)
    memory = {(r["op"], r["implementation"]): r for r in payload["reports"]["fused"]}
    assert memory[("gated_mlp", "pallax[xla]")]["residual_mib"] == 0
    assert memory[("gated_mlp", "naive")]["residual_mib"] > 0
    ce_ours = memory[("linear_cross_entropy", "pallax[xla]")]
    ce_naive = memory[("linear_cross_entropy", "naive (optax)")]
    assert ce_ours["residual_mib"] < ce_naive["residual_mib"]
    cases = {(r["name"], r["implementation"]) for r in payload["results"]}
    assert any(
        name.startswith("linear_cross_entropy") and impl == "naive (optax)" for name, impl in cases
    )
    assert all(r["error"] is None for r in payload["results"])


def test_attention_suite_runs_pallax_and_jax_nn_side_by_side(tmp_path):
    results = _run_suite(tmp_path, "attention", runs=1)["results"]
    assert {r["implementation"] for r in results} == {"pallax[xla]", "jax.nn[xla]"}
    assert all(r["error"] is None and r["flops_per_s"] > 0 for r in results)
    causal = [r for r in results if "causal" in r["name"]]
    assert causal and len(causal) == len(results) / 2


def test_decode_suite_reports_bandwidth_for_contiguous_and_paged(tmp_path):
    results = _run_suite(tmp_path, "decode", runs=1)["results"]
    names = {r["name"].split()[0] for r in results}
    assert names == {"contiguous", "paged/128"}
    assert all(r["error"] is None and r["bytes_per_s"] > 0 for r in results)


def test_model_suite_reports_mfu_of_the_train_step(tmp_path):
    payload = _run_suite(tmp_path, "model", runs=2)
    (result,) = payload["results"]
    assert result["error"] is None and 0 < result["roofline_fraction"] < 1
    components = {r["component"] for r in payload["reports"]["model"]}
    assert components == {"rms_norm", "attention", "gated_mlp", "linear_cross_entropy"}
