"""The SDC guard in the training loop: a flipped bit is detected in its step, the
replica is named, and training ends bit-identical to a fault-free run."""

from __future__ import annotations

import json

import pytest

from pallax.fault import Injection, parse_injection
from pallax.testing import run_with_cpu_devices

_CODE = """
from pallax.train import main
main(["--steps", "6", "--batch", "8", "--seq-len", "32", "--quiet", "--sample-tokens", "2",
      "--json", "{out}"{extra}])
"""


def test_bit_flip_is_detected_named_and_recovered(tmp_path):
    clean, faulty = tmp_path / "clean.json", tmp_path / "faulty.json"
    run_with_cpu_devices(_CODE.format(out=clean, extra=""))
    run_with_cpu_devices(
        _CODE.format(out=faulty, extra=', "--sdc-check", "--inject", "bitflip:replica=1,step=3"')
    )
    a, b = json.loads(clean.read_text()), json.loads(faulty.read_text())
    assert b["sdc_events"] == [{"step": 3, "replicas": [1], "workers": [0], "replayed": True}]
    assert a["sdc_events"] == []
    assert b["param_checksum"] == a["param_checksum"]
    assert b["loss_history"] == a["loss_history"]


@pytest.mark.parametrize(
    "text",
    [
        "bitflip:step=3",
        "bitflip",
        "bitflip:replica=1,worker=0,step=3",
        "kill:replica=1,step=3",
        "kill:worker=1",
        "kill:worker=x,step=3",
        "corrupt-persistent:worker=1,step=3",
        "bitflip:replica=-1,step=3",
        "explode:step=3",
    ],
)
def test_injection_spec_errors(text):
    with pytest.raises(ValueError, match="--inject"):
        parse_injection(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("bitflip:replica=1,step=20", Injection("bitflip", 20, replica=1)),
        ("bitflip:worker=3,step=7", Injection("bitflip", 7, worker=3)),
        ("kill:worker=2,step=37", Injection("kill", 37, worker=2)),
        ("hang:worker=1,step=4", Injection("hang", 4, worker=1)),
        ("corrupt-persistent:step=5", Injection("corrupt-persistent", 5)),
    ],
)
def test_injection_spec_round_trips(text, expected):
    assert parse_injection(text) == expected
    assert parse_injection(expected.spec()) == expected
