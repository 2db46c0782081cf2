"""KV-cache scales on vLLM's own quantization method objects: what a target derives from received bytes equals what
its source derived from the checkpoint (no engine started; the in-worker check runs the real model)."""

from __future__ import annotations

import pytest
import torch

# Not just "vllm": without vLLM installed, pytest's rootdir on sys.path makes tests/vllm a namespace package.
pytest.importorskip("vllm.model_executor")
pytestmark = pytest.mark.vllm

from runtime_hooks.derived_state import module_numbers  # noqa: E402
from runtime_hooks.discovery import discover_tensors  # noqa: E402
from runtime_hooks.engines.vllm.adapter import rederive_kv_scales  # noqa: E402

DUMMY = -0.000942  # what vLLM's dummy loader (seed 1234) writes into every 0-dim scale Parameter


class _Attention(torch.nn.Module):
    """The KV-cache quantization state of a vLLM attention layer, built by vLLM's own functions."""

    def __init__(self, scales: tuple[float, float, float, float]) -> None:
        from vllm.model_executor.layers.attention.attention import set_default_quant_scales
        from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

        super().__init__()
        set_default_quant_scales(self, register_buffer=True)
        self.kv_cache_dtype = "fp8_e4m3"
        self.calculate_kv_scales = False
        self.quant_method = BaseKVCacheMethod(None)  # type: ignore[arg-type]
        self.quant_method.create_weights(self)
        with torch.no_grad():
            for name, value in zip(("k_scale", "v_scale", "q_scale", "prob_scale"), scales, strict=True):
                getattr(self, name).fill_(value)
        self.quant_method.process_weights_after_loading(self)


class _Model(torch.nn.Module):
    def __init__(self, scales: tuple[float, float, float, float]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Attention(scales), _Attention(scales)])


def _receive(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """What the sidecar does: every tensor the hook exposes gets the source's bytes."""
    src = discover_tensors(source, "cpu")
    for name, t in discover_tensors(target, "cpu").items():
        t.copy_(src[name])


@pytest.fixture
def source() -> _Model:
    return _Model((0.25, 0.5, 0.125, 0.75))  # an fp8 checkpoint's calibrated scales


def test_an_fp8_kv_cache_target_rederives_the_scale_floats_from_the_received_scale_buffers(source):
    target = _Model((DUMMY,) * 4)
    assert target.layers[0]._k_scale_float == 1.0, "dummy weights: vLLM falls back to scale 1.0"
    _receive(target, source)
    stale = module_numbers(target)
    assert stale != module_numbers(source), "the received bytes alone leave the dummy-derived floats"
    assert rederive_kv_scales(target) == 2
    assert module_numbers(target) == module_numbers(source)
    for t, s in zip(target.layers, source.layers, strict=True):
        assert (t._k_scale_float, t._v_scale_float, t._q_scale_float) == (0.25, 0.5, 0.125)
        assert (t._k_scale_float, t._v_scale_float, t._q_scale_float) == (s._k_scale_float, s._v_scale_float,
                                                                          s._q_scale_float)
        assert t._prob_scale_float == s._prob_scale_float == 1.0, "vLLM leaves the prob float at 1.0"


def test_the_derived_numbers_name_every_scale_float_of_every_layer(source):
    numbers = module_numbers(source)
    for i in (0, 1):
        for x in ("k", "v", "q", "prob"):
            assert f"layers.{i}._{x}_scale_float" in numbers
    assert numbers["layers.0._k_scale_float"] == "float:" + (0.25).hex()
    assert "layers.0.training" not in numbers
