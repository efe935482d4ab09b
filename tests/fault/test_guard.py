"""The SDC guard in the training loop: a flipped bit is detected in its step, the
replica is named, and training ends bit-identical to a fault-free run."""

from __future__ import annotations

import json

import pytest

from pallax.fault import parse_injection
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
    assert b["sdc_events"] == [{"step": 3, "replicas": [1], "replayed": True}]
    assert a["sdc_events"] == []
    assert b["param_checksum"] == a["param_checksum"]
    assert b["loss_history"] == a["loss_history"]


@pytest.mark.parametrize("text", ["kill:worker=2,step=3", "bitflip:step=3", "bitflip"])
def test_injection_spec_errors(text):
    with pytest.raises(ValueError, match="bitflip:replica=R,step=S"):
        parse_injection(text)


def test_injection_spec():
    assert parse_injection("bitflip:replica=1,step=20") == (20, 1)
