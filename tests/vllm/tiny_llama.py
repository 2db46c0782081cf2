"""Build a tiny, seeded Llama checkpoint locally (safetensors + config.json); nothing comes from a hub.

    python -m tests.vllm.tiny_llama OUT_DIR [--dtype bfloat16|float32|float16] [--hidden 256] [--layers 2] [--seed 0]

vLLM is run on it with `skip_tokenizer_init=True` and prompt token ids, so no tokenizer is needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TINY = {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 512}


def make_tiny_llama(out: str | Path, dtype: str = "bfloat16", seed: int = 0, **overrides: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**TINY, **overrides}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init so greedy decoding is not flat
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    # vLLM reads dtype from config.json; make it explicit whichever key this transformers version writes.
    meta = json.loads((out / "config.json").read_text())
    meta["torch_dtype"] = dtype
    meta["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=TINY["hidden"])
    p.add_argument("--layers", type=int, default=TINY["layers"])
    a = p.parse_args()
    print(make_tiny_llama(a.out, a.dtype, a.seed, hidden=a.hidden, layers=a.layers))


if __name__ == "__main__":
    main()
