"""Checkpoints the end-to-end suite serves: tiny random Mixtrals written by transformers (the
Hugging Face format a user brings), each with a tokenizer.json whose vocabulary is the model's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# fmt: off
WORDS = [
    "the", "a", "an", "cat", "dog", "bird", "fish", "sat", "ran", "flew", "swam", "on", "in",
    "under", "over", "mat", "rug", "tree", "pond", "big", "small", "red", "blue", "green",
    "old", "new", "quick", "slow", "and", "or", "but", "then", "so", "it", "was", "is", "are",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "yes", "no",
    "here", "there", "now", "today", "moe", "expert", "token", "rank", "plan",
]
# fmt: on


def tokenizer_words(vocab_size: int) -> list[str]:
    """[UNK] = 0, </s> = 1, then WORDS, then w<i> up to `vocab_size` entries."""
    words = ["[UNK]", "</s>", *WORDS]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    return words[:vocab_size]


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """A WordLevel tokenizer (whitespace split, words joined with spaces on decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {word: index for index, word in enumerate(tokenizer_words(vocab_size))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def mixtral_spec(layers: int, vocab_size: int, experts: int = 8) -> dict[str, Any]:
    """spec.model of the checkpoint `write_mixtral` makes (grouped-query attention: 1 KV head)."""
    return {
        "architecture": "Mixtral",
        "layers": layers,
        "expertsPerLayer": experts,
        "hiddenSize": 32,
        "ffnHiddenSize": 64,
        "attentionHeads": 2,
        "keyValueHeads": 1,
        "headDim": 16,
        "topK": 2,
        "vocabSize": vocab_size,
        "dtype": "float32",
    }


def write_mixtral(
    path: Path, *, layers: int, vocab_size: int, seed: int = 0, experts: int = 8
) -> Path:
    """A random MixtralForCausalLM of `mixtral_spec`'s shape, saved by transformers, with a
    tokenizer. A larger init than the default makes routing and greedy choices decisive."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    spec = mixtral_spec(layers, vocab_size, experts)
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=spec["hiddenSize"],
        intermediate_size=spec["ffnHiddenSize"],
        num_hidden_layers=layers,
        num_attention_heads=spec["attentionHeads"],
        num_key_value_heads=spec["keyValueHeads"],
        head_dim=spec["headDim"],
        num_local_experts=spec["expertsPerLayer"],
        num_experts_per_tok=spec["topK"],
        max_position_embeddings=256,
        initializer_range=0.15,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_tokenizer(path, vocab_size)
    return path
