"""Generated test material: a TensorRT-LLM checkpoint (TRT-LLM tensor names, bf16, FP8 and INT8 weights with their
scale tensors, per-rank shards) and a Hugging Face-like model directory. Seeded random bytes; nothing downloaded.

    python -m tests.trtllm.checkpoints OUT [--tp 2] [--layers 6]      # prints the directory and its size
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# ~155 MB at TP=2 with these sizes (2 bf16, 2 FP8 and 2 INT8 layers; embeddings and lm_head in bf16).
CKPT = {"hidden": 1024, "intermediate": 2816, "layers": 6, "vocab": 16000, "heads": 16, "kv_heads": 4}
SMALL_CKPT = {"hidden": 256, "intermediate": 704, "layers": 3, "vocab": 4000, "heads": 4, "kv_heads": 2}
LAYER_ALGOS = ("bf16", "FP8", "W8A16")


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * 0.02


def _linear(g: torch.Generator, algo: str, out: int, inp: int) -> dict[str, torch.Tensor]:
    w = _randn(g, out, inp)
    if algo == "bf16":
        return {"weight": w.to(torch.bfloat16)}
    if algo == "FP8":  # per-tensor scales, float8_e4m3fn weight
        scale = w.abs().max() / 448.0
        return {"weight": (w / scale).to(torch.float8_e4m3fn),
                "weights_scaling_factor": scale.reshape(1).float(),
                "activation_scaling_factor": torch.rand(1, generator=g) + 0.5}
    # W8A16: int8 weight, one bf16 scale per output channel
    scale = w.abs().amax(dim=1) / 127.0
    return {"weight": torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8),
            "per_channel_scale": scale.to(torch.bfloat16),
            "weights_scaling_factor": scale.to(torch.bfloat16)}


def rank_tensors(cfg: dict[str, int], tp: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    h, inter, v = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    head = h // cfg["heads"]
    qkv_out = (cfg["heads"] + 2 * cfg["kv_heads"]) * head
    t: dict[str, torch.Tensor] = {"transformer.vocab_embedding.weight": _randn(g, v // tp, h).to(torch.bfloat16)}
    for i in range(cfg["layers"]):
        p = f"transformer.layers.{i}."
        algo = LAYER_ALGOS[i % len(LAYER_ALGOS)]
        t[p + "input_layernorm.weight"] = (1 + _randn(g, h)).to(torch.bfloat16)
        t[p + "post_layernorm.weight"] = (1 + _randn(g, h)).to(torch.bfloat16)
        for name, (o, n) in {"attention.qkv": (qkv_out // tp, h), "attention.dense": (h, h // tp),
                             "mlp.fc": (inter // tp, h), "mlp.gate": (inter // tp, h),
                             "mlp.proj": (h, inter // tp)}.items():
            for k, x in _linear(g, algo, o, n).items():
                t[f"{p}{name}.{k}"] = x
        t[p + "attention.kv_cache_scaling_factor"] = torch.rand(1, generator=g) + 0.5  # INT8 KV cache
    t["transformer.ln_f.weight"] = (1 + _randn(g, h)).to(torch.bfloat16)
    t["lm_head.weight"] = _randn(g, v // tp, h).to(torch.bfloat16)
    return t


def make_trtllm_checkpoint(out: str | Path, tp: int = 2, cfg: dict[str, int] | None = None, seed: int = 0) -> Path:
    """config.json + quant_cfg.json + rank{N}.safetensors, laid out as TRT-LLM's convert_checkpoint.py writes them."""
    cfg = {**CKPT, **(cfg or {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quantized = {f"transformer.layers.{i}.{m}": {"quant_algo": LAYER_ALGOS[i % 3]}
                 for i in range(cfg["layers"]) if LAYER_ALGOS[i % 3] != "bf16"
                 for m in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")}
    config = {
        "architecture": "LlamaForCausalLM", "dtype": "bfloat16", "logits_dtype": "float32",
        "vocab_size": cfg["vocab"], "max_position_embeddings": 4096, "hidden_size": cfg["hidden"],
        "num_hidden_layers": cfg["layers"], "num_attention_heads": cfg["heads"],
        "num_key_value_heads": cfg["kv_heads"], "hidden_act": "silu", "intermediate_size": cfg["intermediate"],
        "norm_epsilon": 1e-5, "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0,
        "use_parallel_embedding": True, "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "INT8"},
    }
    (out / "config.json").write_text(json.dumps(config, indent=4))
    (out / "quant_cfg.json").write_text(json.dumps({"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "INT8",
                                                    "quantized_layers": quantized}, indent=4))
    for r in range(tp):
        save_file(rank_tensors(cfg, tp, r, seed), str(out / f"rank{r}.safetensors"), metadata={"rank": str(r)})
    return out


def make_model_dir(out: str | Path, seed: int = 0) -> Path:
    """A Hugging Face-shaped directory: two safetensors shards + index, tokenizer files, a nested file, an empty
    file, and hidden entries that must not travel."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards = {"model-00001-of-00002.safetensors": {"model.embed_tokens.weight": _randn(g, 4000, 512)},
              "model-00002-of-00002.safetensors": {"lm_head.weight": _randn(g, 3000, 512),
                                                   "model.norm.weight": _randn(g, 512)}}
    weight_map = {}
    for fname, tensors in shards.items():
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(out / fname))
        weight_map.update(dict.fromkeys(tensors, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 512}))
    (out / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(3000)}}}))
    (out / "tokenizer_config.json").write_text("{}")
    (out / "generation_config.json").write_bytes(b"")
    (out / "original").mkdir(exist_ok=True)
    (out / "original" / "params.json").write_text('{"dim": 512}')
    (out / ".cache").mkdir(exist_ok=True)
    (out / ".cache" / "lock").write_text("not part of the model")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs")
    return out


def digests(root: Path) -> dict[str, str]:
    """sha256 of every non-hidden file under root, by relative path: the equality tests compare these."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(x.startswith(".") for x in rel.split("/")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--layers", type=int, default=CKPT["layers"])
    a = p.parse_args()
    path = make_trtllm_checkpoint(a.out, a.tp, {"layers": a.layers})
    print(path, sum(f.stat().st_size for f in path.iterdir()))


if __name__ == "__main__":
    main()
