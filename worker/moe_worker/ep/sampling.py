"""Choosing the next token of each sequence from its logits, and when a sequence stops.

Per-row parameters (greedy, temperature, top_k, top_p) apply to a batch of logits at once. The
randomness of a row is a pure function of (its request's seed, the index of the token being
sampled): a request's tokens depend on its own seed and logits only, never on what else shares
the batch or on which rank samples it. Sampling draws exponential noise from that keyed
generator and takes argmax(p / noise), which picks token i with probability p_i.

Legend: B rows (sequences), V vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from moe_worker.serving.generation import SamplingParams, TokenLogprob, finish_reason

__all__ = ["SamplingParams", "filter_logits", "finish_reason", "sample", "token_logprobs"]


def token_logprobs(logits_BV: Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Row b's log-probability of tokens[b] and its `top` most likely tokens, under the model's
    own distribution (log-softmax of the fp32 logits: no temperature, top-k or top-p), as
    OpenAI and vLLM report them."""
    logprobs_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    index_B = torch.tensor(list(tokens), dtype=torch.int64, device=logprobs_BV.device)
    chosen_B = logprobs_BV.gather(1, index_B[:, None])[:, 0].tolist()
    if top <= 0:
        return [TokenLogprob(lp) for lp in chosen_B]
    values_BK, ids_BK = logprobs_BV.topk(min(top, logprobs_BV.shape[1]), dim=-1, sorted=True)
    return [
        TokenLogprob(lp, tuple(zip(ids, values, strict=True)))
        for lp, ids, values in zip(chosen_B, ids_BK.tolist(), values_BK.tolist(), strict=True)
    ]


def filter_logits(logits_BV: Tensor, top_k_B: Tensor, top_p_B: Tensor) -> Tensor:
    """Logits with every token outside each row's top-k, then top-p, set to -inf.

    top_k 0 keeps all; top_p keeps the shortest prefix of tokens by falling probability whose
    mass reaches top_p (the most likely token always stays). Ties are broken by token id.
    """
    vocab = logits_BV.shape[-1]
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True, stable=True)
    k_B = torch.where(top_k_B > 0, top_k_B, vocab).to(logits_BV.device)
    keep_BV = torch.arange(vocab, device=logits_BV.device)[None, :] < k_B[:, None]
    probs_BV = torch.softmax(sorted_BV.masked_fill(~keep_BV, float("-inf")), dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
    keep_BV &= mass_before_BV < top_p_B.to(logits_BV)[:, None]
    keep_in_vocab_order = torch.zeros_like(keep_BV).scatter(1, order_BV, keep_BV)
    return logits_BV.masked_fill(~keep_in_vocab_order, float("-inf"))


def sample(
    logits_BV: Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int]
) -> Tensor:
    """Next token of every row [B]: row b uses params[b], keyed by (seeds[b], steps[b]).

    `steps[b]` is the index of the token being generated (0 for the first), so a request
    replayed with the same seed reproduces its tokens.
    """
    logits_BV = logits_BV.float()
    greedy_B = torch.tensor([p.greedy for p in params], dtype=torch.bool)
    tokens_B = logits_BV.argmax(dim=-1)
    if bool(greedy_B.all()):
        return tokens_B
    device = logits_BV.device
    temperature_B = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    top_k_B = torch.tensor([p.top_k for p in params], device=device)
    top_p_B = torch.tensor([p.top_p for p in params], device=device)
    probs_BV = torch.softmax(
        filter_logits(logits_BV / temperature_B[:, None], top_k_B, top_p_B), -1
    )
    vocab = logits_BV.shape[1]
    noise_BV = torch.stack(
        [_exponential(vocab, seed, step, device) for seed, step in zip(seeds, steps, strict=True)]
    )
    sampled_B = (probs_BV / noise_BV).argmax(dim=-1)
    return torch.where(greedy_B.to(device), tokens_B, sampled_B)


def _exponential(size: int, seed: int, step: int, device: torch.device) -> Tensor:
    digest = hashlib.sha256(f"sample/{seed}/{step}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    noise = torch.empty(size, device=device).exponential_(generator=generator)
    return noise.clamp_min(torch.finfo(noise.dtype).tiny)  # a zero draw must not divide by 0
