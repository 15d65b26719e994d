"""(c) The serving engine at world 1 on the device against transformers' `generate()` on the same
prompts and weights: a mid-size random Mixtral (about 1.8B parameters) in bf16.

transformers makes the model on the device and saves it; our runtime serves that checkpoint as
one rank (scheduler, continuous batching, KV cache, sampling on the device), driven through its
Backend by closed-loop clients (no HTTP), exactly as `moe-worker bench-serving` drives it on the
CPU; `generate()` runs the same prompts in static batches of the concurrency, left-padded,
greedy. Output tokens/s, TTFT and TPOT (p50, p99) per concurrency, and moe-ep's tokens/s over
transformers'.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_worker.bench.gpu_check.device import Device
from moe_worker.bench.gpu_check.record import Recorder
from moe_worker.bench.gpu_check.world1 import serving
from moe_worker.bench.serving import run_clients, run_generate
from moe_worker.models.base import DTYPES

MID_MIXTRAL = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 4096,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
}


@dataclass(frozen=True)
class ServingCheckOptions:
    model: dict[str, Any] = field(default_factory=lambda: dict(MID_MIXTRAL))
    dtype: str = "bfloat16"
    concurrency: tuple[int, ...] = (1, 8, 32)
    rounds: int = 2
    """Requests per concurrency c: max(min_requests, rounds * c)."""
    min_requests: int = 8
    prompt_tokens: tuple[int, int] = (64, 192)
    max_tokens: int = 48
    kv_cache_tokens: int = 32768
    max_batch_tokens: int = 2048

    def requests(self, concurrency: int) -> int:
        return max(self.min_requests, self.rounds * concurrency)


GPU = ServingCheckOptions()
TINY = ServingCheckOptions(
    model={
        **MID_MIXTRAL, "vocab_size": 128, "hidden_size": 32, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    },
    dtype="float32", concurrency=(1, 2), rounds=1, min_requests=2, prompt_tokens=(3, 9),
    max_tokens=3, kv_cache_tokens=256, max_batch_tokens=32,
)  # fmt: skip


def run(out: Recorder, device: Device, options: ServingCheckOptions = GPU) -> None:
    dev = device.torch
    vocab = options.model["vocab_size"]
    texts = make_prompts(options, vocab, options.requests(max(options.concurrency)))
    with tempfile.TemporaryDirectory(prefix="gpu-check-serving-") as tmp:
        path = Path(tmp) / "mid-mixtral"
        hf = make_model(options, dev)
        hf.save_pretrained(path)
        out.put("model", {**options.model, "dtype": options.dtype, "parameters": _count(hf)})
        out.put(
            "options", {"max_tokens": options.max_tokens, "prompt_tokens": options.prompt_tokens}
        )
        with serving(
            path,
            device,
            kv_cache_tokens=options.kv_cache_tokens,
            max_batch_tokens=options.max_batch_tokens,
            max_queued_requests=2 * max(options.concurrency),
        ) as runtime:
            run_clients(runtime, texts[:2], 1, 4)  # warm-up
            for c in options.concurrency:
                figures = run_clients(runtime, texts[: options.requests(c)], c, options.max_tokens)
                out.put("moe_ep", str(c), figures)
        run_generate(hf, texts[:2], 1, 4, dev)  # warm-up
        for c in options.concurrency:
            figures = run_generate(hf, texts[: options.requests(c)], c, options.max_tokens, dev)
            out.put("transformers", str(c), figures)
            ours = out.data["moe_ep"][str(c)]["output_tokens_per_s"]
            out.put("tokens_per_s_over_transformers", str(c), ours / figures["output_tokens_per_s"])


def make_model(options: ServingCheckOptions, device: torch.device) -> Any:
    """The random Mixtral, drawn on `device` in the options' dtype; EOS off (fixed lengths)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[options.dtype])
    try:
        with device:
            model = MixtralForCausalLM(MixtralConfig(**options.model)).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    return model


def make_prompts(options: ServingCheckOptions, vocab: int, count: int) -> list[list[int]]:
    rng = random.Random("gpu-check/serving")
    low, high = options.prompt_tokens
    return [[rng.randrange(vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
