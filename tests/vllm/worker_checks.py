"""Checks that run inside a live vLLM worker (through `LLM.collective_rpc`), against vLLM's real model,
config and distributed state: the adapter's steps driven directly, without a hook or a sidecar."""

from __future__ import annotations

from typing import Any

import torch


def _meta(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {n: (str(t.dtype), tuple(t.shape)) for n, t in tensors.items()}


def adapter_steps(worker: Any) -> dict[str, Any]:
    """source: load_from_storage -> discover; target: prepare_target -> discover -> bytes copied -> after_receive.

    Returns plain data for the test to assert on (it runs in another process).
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.utils.torch_utils import set_default_torch_dtype

    from runtime_hooks.engines.vllm import compat as vllm_compat
    from runtime_hooks.engines.vllm.adapter import VllmAdapter, forget_model_layers
    from runtime_hooks.exposure import compute_fingerprint

    vllm_config = worker.vllm_config
    model_config = vllm_config.model_config
    loader = get_model_loader(vllm_config.load_config)
    device = torch.device(vllm_config.device_config.device)

    def build() -> torch.nn.Module:
        with set_default_torch_dtype(model_config.dtype), device:
            return vllm_compat.create_model(loader, vllm_config, model_config)

    out: dict[str, Any] = {"loader": type(loader).__name__}
    with set_current_vllm_config(vllm_config), set_default_torch_dtype(model_config.dtype):
        # The engine's own model is registered under the same layer names: step aside for the test models.
        live = worker.model_runner.get_model()
        saved = dict(vllm_config.compilation_config.static_forward_context)
        forget_model_layers(vllm_config, live)
        try:
            src = VllmAdapter(build, vllm_config, model_config, loader.storage_loader, device)
            fp_src = compute_fingerprint(src.identity(), src.discover_tensors())
            src.load_from_storage()
            t_src = src.discover_tensors()
            d_src = src.derived_state()
            forget_model_layers(vllm_config, src.model)

            dst = VllmAdapter(build, vllm_config, model_config, loader.storage_loader, device)
            fp_dst = compute_fingerprint(dst.identity(), dst.discover_tensors())
            dst.prepare_target()
            t_dst = dst.discover_tensors()
            out["same_layout"] = _meta(t_src) == _meta(t_dst)
            out["names"] = sorted(t_src)
            out["only_in_source"] = sorted(set(t_src) - set(t_dst))
            out["only_in_target"] = sorted(set(t_dst) - set(t_src))
            out["same_identity"] = src.identity() == dst.identity()
            out["same_fingerprint"] = fp_src == fp_dst
            weights = [n for n in t_src if n.endswith(".weight") and t_src[n].numel()]
            out["dummy_differs"] = any(not torch.equal(t_src[n], t_dst[n]) for n in weights)
            out["zero_byte"] = sorted(n for n, t in t_dst.items() if t.numel() == 0)
            # What the sidecar does, in-process: write every byte of the source's tensors into the target's.
            for n, t in t_dst.items():
                if t.numel():
                    t.copy_(t_src[n])
            dst.after_receive()
            out["equal_after_receive"] = all(torch.equal(t_src[n], t) for n, t in dst.discover_tensors().items())
            d_dst = dst.derived_state()
            out["derived_count"] = len(d_src)
            out["derived_differing"] = sorted(k for k in d_src.keys() | d_dst.keys() if d_src.get(k) != d_dst.get(k))
            # A failed receive: the next load from storage starts from a fresh model and ends equal to the source.
            dst.reset_for_retry()
            dst.load_from_storage()
            out["equal_after_retry"] = all(torch.equal(t_src[n], t) for n, t in dst.discover_tensors().items())
            out["derived_equal_after_retry"] = dst.derived_state() == d_src
            forget_model_layers(vllm_config, dst.model)
        finally:
            vllm_config.compilation_config.static_forward_context.clear()
            vllm_config.compilation_config.static_forward_context.update(saved)
    return out
