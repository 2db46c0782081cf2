"""Tensor discovery for the vLLM adapter: pure torch, runs without vLLM installed."""

from __future__ import annotations

import torch

from runtime_hooks.discovery import discover_tensors


class _Packed(torch.nn.Module):
    """Shaped like vLLM CPU's linear after post-processing: a kernel closure holding the packed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        packed = torch.randn(8, 4)
        self.cpu_linear = lambda x, weight, bias: x @ packed.t()


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)
        self.head = torch.nn.Linear(4, 16, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("inv_freq", torch.arange(4, dtype=torch.float32))
        self.register_buffer("none_buffer", None)
        self.scale = torch.tensor(0.5)  # a plain tensor attribute, neither parameter nor buffer
        self.caches = [torch.zeros(2), torch.zeros(3)]
        self.tables = {"a": torch.ones(2)}
        self.packed = _Packed()
        self.on_meta = torch.nn.Parameter(torch.empty(4, device="meta"), requires_grad=False)


def test_discovery_finds_parameters_buffers_attributes_containers_and_closure_tensors():
    found = discover_tensors(_Model())
    assert {"embed.weight", "head.weight", "inv_freq", "scale", "caches.0", "caches.1", "tables.a",
            "packed.weight", "packed.cpu_linear.packed"} <= set(found)


def test_discovery_keeps_aliases_and_zero_byte_tensors_and_skips_meta_and_none():
    m = _Model()
    found = discover_tensors(m)
    assert found["head.weight"].untyped_storage().data_ptr() == found["embed.weight"].untyped_storage().data_ptr()
    assert found["packed.weight"].numel() == 0
    assert "on_meta" not in found and "none_buffer" not in found


def test_discovery_returns_plain_tensors_that_share_the_parameters_memory():
    m = _Model()
    found = discover_tensors(m)
    assert not isinstance(found["embed.weight"], torch.nn.Parameter)
    found["embed.weight"].fill_(3.0)
    assert bool((m.embed.weight == 3.0).all())


def test_discovery_can_keep_only_the_engine_device():
    assert discover_tensors(_Model(), "cuda") == {}
    assert "inv_freq" in discover_tensors(_Model(), "cpu")
