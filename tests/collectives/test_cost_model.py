"""The collective cost model against numbers worked out by hand."""

from __future__ import annotations

import pytest

from pallax.collectives import cost_model as cm

TOY = cm.ChipSpec("toy", peak_flops=1e12, hbm_bytes_per_s=1e12, link_bytes_per_s=1e9)


def test_ring_collective_times():
    # 8 devices, 8 GB gathered: each device receives 7 GB over a 1 GB/s link.
    assert cm.all_gather_time(8e9, 8, TOY) == pytest.approx(7.0)
    assert cm.all_gather_time(8e9, 8, TOY, bidirectional=True) == pytest.approx(3.5)
    assert cm.reduce_scatter_time(8e9, 8, TOY) == pytest.approx(7.0)
    assert cm.all_reduce_time(8e9, 8, TOY) == pytest.approx(14.0)
    assert cm.all_gather_time(8e9, 1, TOY) == 0.0


def test_predictions_by_hand():
    # all_gather: m=1024, k=1024, n=4096 over 4 devices, bf16.
    # compute: 2*1024*1024*4096/4 flops = 2.147e9 -> 2.147 ms at 1 TFLOP/s.
    # comm: 3/4 * 1024*1024*2 bytes / 1e9 = 1.573 ms.
    ring = cm.predict(m=1024, k=1024, n_cols=4096, devices=4, chip=TOY, schedule="ring")
    assert ring.compute_s == pytest.approx(2.147483648e-3)
    assert ring.communication_s == pytest.approx(1.572864e-3)
    assert ring.lower_bound_s == pytest.approx(ring.compute_s)
    assert ring.upper_bound_s == pytest.approx(ring.compute_s + ring.communication_s)
    # Per step compute 0.537 ms > per step transfer 0.524 ms: compute bound, fully hidden.
    assert ring.estimate_s == pytest.approx(ring.compute_s)
    assert ring.overlap_fraction == pytest.approx(1.0)
    naive = cm.predict(m=1024, k=1024, n_cols=4096, devices=4, chip=TOY, schedule="naive")
    assert naive.estimate_s == pytest.approx(naive.upper_bound_s)
    assert naive.overlap_fraction == pytest.approx(0.0)


def test_communication_bound_ring_exposes_part_of_the_transfer():
    # Few columns: per-step compute is small, the transfer dominates.
    p = cm.predict(m=4096, k=4096, n_cols=256, devices=8, chip=TOY, schedule="ring")
    assert p.communication_s > p.compute_s
    assert p.lower_bound_s <= p.estimate_s <= p.upper_bound_s
    step_comm = p.communication_s / 7
    assert p.estimate_s == pytest.approx(7 * step_comm + p.compute_s / 8)
    bidi = cm.predict(
        m=4096, k=4096, n_cols=256, devices=8, chip=TOY, schedule="ring_bidirectional"
    )
    assert bidi.estimate_s < p.estimate_s


def test_reduce_scatter_moves_the_output():
    p = cm.predict(m=1024, k=8192, n_cols=2048, devices=4, chip=TOY, kind="reduce_scatter")
    assert p.communication_s == pytest.approx(0.75 * 1024 * 2048 * 2 / 1e9)


def test_chooser_prefers_overlap_and_both_directions():
    best = cm.choose_schedule(m=8192, k=8192, n_cols=1024, devices=8, chip=cm.CHIPS["tpu_v5e"])
    assert best.schedule == "ring_bidirectional"
    single = cm.choose_schedule(m=8192, k=8192, n_cols=1024, devices=1, chip=cm.CHIPS["h100"])
    assert single.schedule == "naive" and single.communication_s == 0


def test_chip_table_is_consistent():
    for chip in cm.CHIPS.values():
        assert chip.peak_flops > 1e14 and chip.hbm_bytes_per_s > chip.link_bytes_per_s > 0
