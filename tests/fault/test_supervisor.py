"""The supervised fault-tolerant job on 4 CPU processes (2 replicas x 2 workers, tiny
model): lost workers, a bit flip and a corrupted persistent checkpoint are survived,
and the parameters end bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_RUN = ["--steps", "12", "--batch", "8", "--seq-len", "32", "--sample-tokens", "2"]


def _train(tmp_path, name, *extra, check=True):
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "pallax.train", *_RUN, "--quiet", "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text()), proc.stdout
    return proc


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run on the same 4 processes and 8-device mesh: like with like
    (one process sums across devices in another order, so its last bits may differ)."""
    return _train(tmp_path_factory.mktemp("baseline"), "clean", "--processes", "4")[0]


def _supervised(tmp_path, name, *injections, extra=()):
    args = ["--processes", "4", "--fault-tolerant", "--ft-dir", str(tmp_path / name)]
    args += ["--checkpoint-every", "5", "--heartbeat-timeout", "60", *extra]
    for spec in injections:
        args += ["--inject", spec]
    return _train(tmp_path, name, *args)


def _check_goodput(report):
    goodput = report["goodput"]
    buckets = sum(v for k, v in goodput.items() if k.endswith("_s") and k != "wall_s")
    assert buckets == pytest.approx(goodput["wall_s"], rel=1e-6)
    assert 0 < goodput["goodput"] < 1 and goodput["productive_s"] > 0


def test_worker0_lost_and_bit_flip(tmp_path, baseline):
    summary, stdout = _supervised(
        tmp_path, "a", "kill:worker=0,step=4", "bitflip:worker=3,step=7", extra=["--sdc-check"]
    )
    report = summary["fault_tolerance"]
    assert report["attempts"] == 2
    (rec,) = report["recoveries"]
    assert rec["lost"] == {"0": "killed (injected)"}
    assert rec["step_reached"] == 4 and rec["steps_redone"] <= 1
    # Worker 0's replacement has an empty tier: it restores its shards from worker 2,
    # the worker of the other replica that holds the same shards.
    assert rec["sources"] == {"0": "peer", "1": "local", "2": "local", "3": "local"}
    assert summary["sdc_events"] == [{"step": 7, "replicas": [1], "workers": [3], "replayed": True}]
    assert summary["param_digest"] == baseline["param_digest"]
    assert summary["final_loss"] == baseline["final_loss"]
    _check_goodput(report)
    assert report["goodput"]["recovery_s"] > 0 and report["goodput"]["replay_s"] > 0
    assert "recovered from step" in stdout and "[goodput]" in stdout


def test_no_intact_replica_and_corrupt_persistent(tmp_path, baseline):
    # Workers 1 and 3 hold the same shards in the two replicas: losing both leaves no
    # in-memory copy, so the job goes back to persistent storage, whose newest
    # checkpoint (step 5) was corrupted at rest and must be rejected.
    summary, _ = _supervised(
        tmp_path,
        "b",
        "kill:worker=1,step=8",
        "kill:worker=3,step=8",
        "corrupt-persistent:step=5",
    )
    (rec,) = summary["fault_tolerance"]["recoveries"]
    assert rec["lost"] == {"1": "killed (injected)", "3": "killed (injected)"}
    assert rec["source"] == "persistent" and rec["rejected_persistent"] == [5]
    assert rec["restored_step"] == 0
    assert (tmp_path / "b" / "persistent.discarded" / "5").is_dir()
    assert summary["param_digest"] == baseline["param_digest"]
    _check_goodput(summary["fault_tolerance"])


@pytest.mark.slow
@pytest.mark.parametrize("worker", [1, 2, 3])
def test_any_worker_lost(tmp_path, baseline, worker):
    summary, _ = _supervised(tmp_path, f"w{worker}", f"kill:worker={worker},step=6")
    (rec,) = summary["fault_tolerance"]["recoveries"]
    assert rec["lost"] == {str(worker): "killed (injected)"} and rec["steps_redone"] <= 1
    assert rec["sources"][str(worker)] == "peer"
    assert summary["param_digest"] == baseline["param_digest"]


@pytest.mark.slow
def test_hung_worker_is_found_by_its_heartbeat(tmp_path, baseline):
    summary, _ = _supervised(
        tmp_path, "hang", "hang:worker=3,step=5", extra=["--heartbeat-timeout", "8"]
    )
    (rec,) = summary["fault_tolerance"]["recoveries"]
    assert list(rec["lost"]) == ["3"] and rec["lost"]["3"].startswith("no progress")
    assert summary["param_digest"] == baseline["param_digest"]


def _beat(step, begun, age, steps_done=3):
    return {"attempt": 0, "phase": "training", "step": step, "begun": begun,
            "time": 1000.0 - age, "steps_done": steps_done}  # fmt: skip


@pytest.mark.parametrize(
    "beats, expected",
    [
        # Worker 3 hung before step 5; the others began step 5 and wait in a collective.
        ([_beat(5, 5, 30), _beat(5, 5, 30), _beat(5, 5, 30), _beat(5, 4, 31)], {3}),
        ([_beat(5, 5, 1), _beat(5, 5, 1), _beat(5, 5, 1), _beat(5, 4, 1)], set()),  # in time
        ([_beat(5, 5, 30)] * 4, {-1}),  # nobody lags: the whole job is stuck
        ([_beat(0, 0, 30, steps_done=0)] * 4, set()),  # compiling the first step
    ],
    ids=["one-hung", "not-yet", "job-hang", "compiling"],
)
def test_hang_detection_names_the_laggard(tmp_path, beats, expected):
    from pallax.fault import Supervisor

    sup = Supervisor([], 4, tmp_path, heartbeat_timeout=20)
    sup.heartbeats = {(0, w): b for w, b in enumerate(beats)}
    assert set(sup._hung(0, [None] * 4, 1000.0)) == expected


@pytest.mark.slow
def test_hot_standby(tmp_path, baseline):
    summary, _ = _supervised(tmp_path, "hot", "kill:worker=2,step=6", extra=["--hot-standby"])
    report = summary["fault_tolerance"]
    assert report["hot_standby"] and report["attempts"] == 2
    # A standby has Python, JAX and pallax imported before it is assigned.
    assert report["recoveries"][0]["worker0_startup_marks"]["main"] < 0.5
    assert summary["param_digest"] == baseline["param_digest"]


def test_a_crash_without_a_lost_worker_is_reported_not_retried(tmp_path):
    proc = _train(
        tmp_path,
        "bug",
        *["--processes", "2", "--fault-tolerant", "--ft-dir", str(tmp_path / "bug")],
        *["--preset", "no-such-preset"],
        check=False,
    )
    assert proc.returncode != 0
    assert "a bug, not a fault" in proc.stderr and "no-such-preset" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--inject", "kill:worker=1,step=3"], "need --fault-tolerant"),
        (["--inject", "bitflip:replica=1,step=3"], "needs --sdc-check"),
        (["--fault-tolerant"], "needs --processes"),
        (["--inject", "kill:step=3"], "kill:worker=W,step=S"),
        (["--inject", "hang:worker=1,step=3"], "need --fault-tolerant"),
    ],
)
def test_command_line_errors(args, message):
    from pallax.train import main

    with pytest.raises(SystemExit, match=message):
        main(args)
