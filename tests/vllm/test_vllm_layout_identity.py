"""What picks the weights' layout is in the identity: two replicas that differ only in compute capability,
kv-cache dtype, a kernel-selecting VLLM_* setting or the kernels vLLM chose never match (no engine started)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

# Not just "vllm": without vLLM installed, pytest's rootdir on sys.path makes tests/vllm a namespace package.
pytest.importorskip("vllm.model_executor")
pytestmark = pytest.mark.vllm

from runtime_hooks.engines.vllm import identity as vllm_identity  # noqa: E402
from runtime_hooks.exposure import compute_fingerprint  # noqa: E402


@pytest.fixture(autouse=True)
def one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.distributed

    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setenv("MX_MODEL_REVISION", "r1")  # the checkpoint's name is not what these tests vary
    for k in [k for k in __import__("os").environ if k.startswith("VLLM_")]:
        monkeypatch.delenv(k)


def _ident(kv_cache_dtype: str = "auto", model: torch.nn.Module | None = None):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    hf = LlamaConfig(hidden_size=256, num_hidden_layers=2, architectures=["LlamaForCausalLM"])
    model_config = SimpleNamespace(model="org/tiny", revision=None, dtype=torch.bfloat16, quantization=None,
                                   hf_config=hf)
    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, data_parallel_size=1, enable_expert_parallel=False),
        cache_config=SimpleNamespace(cache_dtype=kv_cache_dtype, calculate_kv_scales=False))
    return vllm_identity.model_identity(vllm_config, model_config, model)


def _differs(a, b) -> list[str]:  # type: ignore[no-untyped-def]
    fa, fb = a.fields(), b.fields()
    assert compute_fingerprint(a, {}) != compute_fingerprint(b, {})
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def test_the_identity_of_one_configuration_is_stable():
    assert _ident() == _ident()


def test_a_kv_cache_dtype_of_its_own_is_another_identity():
    assert _differs(_ident("auto"), _ident("fp8")) == ["extra.kv_cache_dtype"]


def test_another_compute_capability_is_another_identity(monkeypatch):
    from vllm.platforms import current_platform

    base = _ident()
    monkeypatch.setattr(current_platform, "get_device_capability", lambda *a, **k: (9, 0), raising=False)
    hopper = _ident()
    monkeypatch.setattr(current_platform, "get_device_capability", lambda *a, **k: (10, 0), raising=False)
    blackwell = _ident()
    assert _differs(hopper, blackwell) == ["extra.capability"]
    assert hopper.fields()["extra.capability"] == "9.0" and base.fields()["extra.capability"] != "9.0"


def test_a_kernel_selecting_vllm_setting_is_another_identity_and_an_unknown_one_too(monkeypatch):
    base = _ident()
    monkeypatch.setenv("VLLM_USE_DEEP_GEMM", "0")
    deep_gemm_off = _ident()
    assert _differs(base, deep_gemm_off) == ["extra.env.VLLM_USE_DEEP_GEMM"]
    monkeypatch.setenv("VLLM_SOMETHING_NEW_IN_A_LATER_RELEASE", "1")  # unknown to the plugin: included
    assert _differs(deep_gemm_off, _ident()) == ["extra.env.VLLM_SOMETHING_NEW_IN_A_LATER_RELEASE"]


def test_pod_specific_and_logging_settings_leave_the_identity_alone_and_values_never_appear(monkeypatch):
    base = _ident()
    monkeypatch.setenv("VLLM_HOST_IP", "10.1.2.3")
    monkeypatch.setenv("VLLM_PORT", "31337")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    monkeypatch.setenv("VLLM_API_KEY", "secret-key")
    monkeypatch.setenv("VLLM_DIST_IDENT", "ident-1234")  # vLLM's own random per-process id
    assert _ident() == base
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "secret-looking-value")
    fields = _ident().fields()
    assert "secret-looking-value" not in str(fields) and "extra.env.VLLM_ATTENTION_BACKEND" in fields


def test_the_kernels_vllm_chose_are_named_in_the_identity():
    class Backend:
        @staticmethod
        def get_name() -> str:
            return "FLASHINFER"

    class FlashImpl:
        pass

    class Fp8MoEMethod:
        moe_kernel = None
        unquantized_backend = None

    attn = torch.nn.Module()
    attn.attn_backend, attn.impl = Backend(), FlashImpl()  # type: ignore[assignment]
    moe = torch.nn.Module()
    moe.quant_method = Fp8MoEMethod()  # type: ignore[assignment]
    model = torch.nn.Sequential(attn, moe)
    kernels = _ident(model=model).fields()["extra.kernels"]
    assert kernels == "attn:FLASHINFER,impl:FlashImpl,quant:Fp8MoEMethod"
    flashinfer = _ident(model=model)
    Backend.get_name = staticmethod(lambda: "TRITON_ATTN")  # type: ignore[method-assign]
    assert _differs(flashinfer, _ident(model=model)) == ["extra.kernels"]
