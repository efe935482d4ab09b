"""How implementation=None|'xla'|'pallas_tpu'|'pallas_mosaic_gpu' is resolved."""

from __future__ import annotations

import pytest

from pallax.kernels import _dispatch, interpret_mode, lowering_platform

ALL = ("xla", "pallas_tpu", "pallas_mosaic_gpu")


def resolve(implementation, available=ALL, supports=lambda impl: None):
    return _dispatch.resolve("op", implementation, available=available, supports=supports)


def test_none_picks_xla_on_cpu_even_in_interpret_mode():
    assert resolve(None) == _dispatch.KernelMode("xla")
    with interpret_mode():
        assert resolve(None) == _dispatch.KernelMode("xla")


@pytest.mark.parametrize(
    "platform, expected", [("tpu", "pallas_tpu"), ("cuda", "pallas_mosaic_gpu")]
)
def test_none_picks_the_platform_kernel(platform, expected):
    with lowering_platform(platform):
        assert resolve(None) == _dispatch.KernelMode(expected)


def test_none_falls_back_to_xla_when_the_kernel_is_missing_or_cannot_take_the_call():
    with lowering_platform("cuda"):
        assert resolve(None, available=("xla", "pallas_tpu")).implementation == "xla"
        assert resolve(None, supports=lambda impl: "too small").implementation == "xla"


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_mosaic_gpu"])
def test_pallas_on_cpu_needs_interpret_mode(implementation):
    with pytest.raises(ValueError, match=r"cannot run on platform 'cpu'.*interpret_mode"):
        resolve(implementation)
    with interpret_mode(detect_races=True):
        mode = resolve(implementation)
    assert mode == _dispatch.KernelMode(implementation, _dispatch.InterpretConfig(True))


def test_env_variable_turns_on_interpret_mode(monkeypatch):
    monkeypatch.setenv("PALLAX_INTERPRET", "1")
    assert resolve("pallas_tpu").interpret == _dispatch.InterpretConfig()
    monkeypatch.setenv("PALLAX_INTERPRET", "0")
    with pytest.raises(ValueError, match="interpret"):
        resolve("pallas_tpu")


def test_kernel_for_the_other_accelerator_is_refused():
    with lowering_platform("tpu"), pytest.raises(ValueError, match="needs a GPU"):
        resolve("pallas_mosaic_gpu")
    with lowering_platform("cuda"), pytest.raises(ValueError, match="needs a TPU"):
        resolve("pallas_tpu")


def test_lowering_platform_compiles_even_inside_interpret_mode():
    with interpret_mode(), lowering_platform("tpu"):
        assert resolve("pallas_tpu") == _dispatch.KernelMode("pallas_tpu", None)


def test_unknown_and_unavailable_implementations():
    with pytest.raises(ValueError, match=r"unknown implementation='cudnn'"):
        resolve("cudnn")
    with pytest.raises(ValueError, match=r"'pallas_mosaic_gpu' does not exist for this op"):
        resolve("pallas_mosaic_gpu", available=("xla", "pallas_tpu"))


def test_explicit_request_that_the_kernel_cannot_take_names_the_reason():
    with interpret_mode(), pytest.raises(ValueError, match="cannot run this call: D is odd"):
        resolve("pallas_tpu", supports=lambda impl: "D is odd")


def test_lowering_platform_rejects_unknown_platforms():
    with pytest.raises(ValueError, match="'tpu' or 'cuda'"), lowering_platform("rocm"):
        pass
