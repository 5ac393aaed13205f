"""Tiny random-weight models of each supported architecture, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoModel, Gemma3TextConfig, GraniteConfig, LlamaConfig, MistralConfig, Qwen2Config

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096)


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
    import corexp.engine.attention  # noqa: F401  (registers the read-out attention)

    torch.manual_seed(seed)
    cfg = tiny_configs()[name]
    model = AutoModel.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in memory on a few sentences (offsets work like the real ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Here are some paragraphs: Please find information that are relevant to the following query in the paragraphs above.",
        "Query: N/A document the cells protein gene expression of patients with cancer risk increased treatment study",
    ] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def save_tiny_checkpoint(folder, name: str = "llama", seed: int = 0):
    """A tiny random-weight model + tokenizer saved like a real checkpoint (safetensors): model.path=folder."""
    model = tiny_model(name, attn="sdpa", seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def save_tiny_encoder(folder, seed: int = 0):
    """A tiny random-weight sentence-transformers bi-encoder (BERT, mean pooling, normalisation) saved like a real one."""
    from pathlib import Path

    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    bert = folder / "bert"
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(bert)
    tok.save_pretrained(bert)
    word = models.Transformer(str(bert), max_seq_length=128)
    st = SentenceTransformer(modules=[word, models.Pooling(word.get_embedding_dimension(), "mean"), models.Normalize()],
                             device="cpu")
    st.save(str(folder / "encoder"))
    return folder / "encoder"
