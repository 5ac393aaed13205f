"""Tiny random-weight models of each supported architecture, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoModel, Gemma3TextConfig, GraniteConfig, LlamaConfig, MistralConfig, Qwen2Config

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


def tiny_configs() -> dict[str, object]:
    return {
        "llama": LlamaConfig(**COMMON),
        "mistral": MistralConfig(**COMMON, sliding_window=16),
        "qwen2": Qwen2Config(**COMMON),
        "gemma3": Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=12, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
        "granite": GraniteConfig(**COMMON, attention_multiplier=0.37),
    }


def tiny_model(name: str, attn: str = "corexp_readout", seed: int = 0):
    import corexp.attention  # noqa: F401  (registers the read-out attention)

    torch.manual_seed(seed)
    cfg = tiny_configs()[name]
    model = AutoModel.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval()
