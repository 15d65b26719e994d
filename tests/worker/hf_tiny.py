"""What the transformers parity tests share: the tiny model's sizes and random token prompts."""

from __future__ import annotations

import torch

VOCAB = 256
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.15,  # larger than the default, so logits and routing are decisive
}


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    """Random token prompts of these lengths, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
