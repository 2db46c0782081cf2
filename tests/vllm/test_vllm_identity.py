"""Identity and CPU post-processing of the vLLM plugin, against the installed vLLM (no engine started)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Not just "vllm": without vLLM installed, pytest's rootdir on sys.path makes tests/vllm a namespace package.
pytest.importorskip("vllm.model_executor")
pytestmark = pytest.mark.vllm

from runtime_hooks.discovery import discover_tensors  # noqa: E402
from runtime_hooks.engines.vllm import adapter as vllm_adapter  # noqa: E402
from runtime_hooks.engines.vllm import identity as vllm_identity  # noqa: E402
from runtime_hooks.engines.vllm import plugin as mx_vllm  # noqa: E402
from runtime_hooks.exposure import compute_fingerprint  # noqa: E402
from tests.vllm.tiny_llama import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), "bfloat16")


def _configs(model: str, *, dtype: torch.dtype = torch.bfloat16, revision: str | None = None,
             quantization: str | None = None, pp: int = 1, hf: object | None = None) -> tuple[object, object]:
    from transformers import LlamaConfig

    hf = hf or LlamaConfig(hidden_size=256, num_hidden_layers=2, architectures=["LlamaForCausalLM"])
    model_config = SimpleNamespace(model=model, revision=revision, dtype=dtype, quantization=quantization, hf_config=hf)
    parallel = SimpleNamespace(pipeline_parallel_size=pp, data_parallel_size=1, enable_expert_parallel=False)
    return SimpleNamespace(parallel_config=parallel), model_config


@pytest.fixture
def tp(monkeypatch: pytest.MonkeyPatch):
    import vllm.distributed

    def set_tp(rank: int, size: int) -> None:
        monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: size)

    set_tp(0, 1)
    monkeypatch.delenv("MX_MODEL_REVISION", raising=False)
    return set_tp


def _ident(*args: object, **kw: object):
    return vllm_identity.model_identity(*_configs(*args, **kw))  # type: ignore[arg-type]


def test_identity_is_stable_for_the_same_model_and_settings(tp, ckpt):
    assert _ident(str(ckpt)) == _ident(str(ckpt))


def test_identity_differs_between_models_revisions_dtypes_and_quantizations(tp, ckpt):
    base = _ident(str(ckpt))
    others = [
        _ident("/elsewhere/other-model"),
        _ident(str(ckpt), revision="v2"),
        _ident(str(ckpt), dtype=torch.float16),
        _ident(str(ckpt), quantization="fp8"),
        _ident(str(ckpt), pp=2),
    ]
    for other in others:
        assert other != base
        assert compute_fingerprint(other, {}) != compute_fingerprint(base, {})


def test_identity_differs_between_tp_sizes_and_ranks(tp, ckpt):
    tp(0, 1)
    one = _ident(str(ckpt))
    tp(0, 2)
    two_r0 = _ident(str(ckpt))
    tp(1, 2)
    two_r1 = _ident(str(ckpt))
    assert len({one, two_r0, two_r1}) == 3
    assert (two_r1.tp_rank, two_r1.tp_size) == (1, 2)


def test_identity_of_a_local_directory_follows_its_config_and_weight_headers(tp, tmp_path):
    a = make_tiny_llama(tmp_path / "m", "bfloat16")
    before = _ident(str(a)).revision
    make_tiny_llama(tmp_path / "m", "float32")  # same path, another build
    after = _ident(str(a)).revision
    assert before.startswith("local-") and after.startswith("local-") and before != after


def test_one_changed_weight_byte_changes_the_revision_of_a_local_directory(tp, tmp_path):
    a = make_tiny_llama(tmp_path / "m", "bfloat16")
    before = _ident(str(a)).revision
    weights = sorted(a.glob("*.safetensors"))[-1]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # a weight byte: same size, same safetensors header
    weights.write_bytes(bytes(data))
    assert _ident(str(a)).revision != before


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment at import; the identity reads the constant when called.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_resolves_offline_to_the_commit_in_the_hugging_face_cache(tp, hf_cache):
    commit = "0123456789abcdef0123456789abcdef01234567"
    refs = hf_cache / "models--org--name" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit + "\n")
    assert _ident("org/name").revision == "hub-" + commit
    assert _ident("org/name", revision=commit).revision == "hub-" + commit


def test_an_unresolvable_hub_id_offline_matches_no_other_replica(tp, hf_cache):
    a, b = _ident("org/unknown").revision, _ident("org/unknown").revision
    assert a.startswith("unresolved-") and b.startswith("unresolved-") and a != b


def test_mx_model_revision_overrides_the_computed_revision(tp, ckpt, monkeypatch):
    monkeypatch.setenv("MX_MODEL_REVISION", "release-7")
    assert _ident(str(ckpt)).revision == "release-7"


def test_a_changed_model_config_changes_the_identity(tp, ckpt):
    from transformers import LlamaConfig

    a = LlamaConfig(hidden_size=256, num_hidden_layers=2, rope_theta=10000.0)
    b = LlamaConfig(hidden_size=256, num_hidden_layers=2, rope_theta=500000.0)
    assert _ident(str(ckpt), hf=a) != _ident(str(ckpt), hf=b)


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)


def _fake_dispatch(kind: str):
    """Stands in for vLLM CPU's `dispatch_cpu_unquantized_gemm` on machines whose CPU takes another path."""

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        if kind == "opaque":  # oneDNN: a C++ handle holds a packed copy
            handle = object()
            layer.cpu_linear = lambda x, weight, bias: (handle, x)
        elif kind == "tensor":  # sgl/zentorch: the packed copy is a tensor in the closure
            packed = layer.weight.detach().clone()
            layer.cpu_linear = lambda x, weight, bias: x @ packed.t()
        else:
            layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)
        if remove_weight and kind != "plain":
            layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    return dispatch


def _post_process_with(kind: str, monkeypatch: pytest.MonkeyPatch) -> tuple[_Layer, list[torch.nn.Module]]:
    from vllm.model_executor.layers import utils as layer_utils

    monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm", _fake_dispatch(kind))
    layer, opaque = _Layer(), []
    with vllm_adapter.exposable_cpu_gemm(opaque):
        layer_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # what vLLM's linear layer calls
    return layer, opaque


def test_cpu_layers_packed_into_opaque_handles_keep_their_weight_and_are_rebuilt_after_receive(monkeypatch):
    layer, opaque = _post_process_with("opaque", monkeypatch)
    assert opaque == [layer] and layer.weight.shape == (8, 4)
    assert "weight" in discover_tensors(layer)


def test_cpu_layers_packed_into_tensors_expose_the_packed_tensor_and_drop_the_weight_as_vllm_does(monkeypatch):
    layer, opaque = _post_process_with("tensor", monkeypatch)
    assert opaque == [] and layer.weight.numel() == 0
    assert discover_tensors(layer)["cpu_linear.packed"].shape == (8, 4)


def test_cpu_layers_on_plain_torch_linear_are_left_alone(monkeypatch):
    layer, opaque = _post_process_with("plain", monkeypatch)
    assert opaque == [] and layer.weight.shape == (8, 4)


def test_register_adds_the_mx_load_format_and_is_idempotent():
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    mx_vllm.register()
    mx_vllm.register()
    loader = get_model_loader(LoadConfig(load_format="mx"))
    assert type(loader) is mx_vllm.loader_class()
    assert loader.storage_config.load_format == "auto"
    custom = get_model_loader(LoadConfig(load_format="mx", model_loader_extra_config={
        "storage_load_format": "safetensors", "sidecar_timeout": 5}))
    assert custom.storage_config.load_format == "safetensors" and custom.sidecar_timeout == 5.0
    assert dataclasses.is_dataclass(custom.storage_config)
