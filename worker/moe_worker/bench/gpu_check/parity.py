"""(a) Tiny Mixtral and Qwen3-MoE checkpoints served at world 1 on the device, against transformers
on the same device: in fp32 the greedy tokens must be equal; in bf16 (both reading the same bf16
checkpoint) the logits must agree within a tolerance relative to their size, and the tokens are
reported (a near tie may legitimately flip in bf16).

Per family and dtype: the model is made with transformers' own config class (seeded, decisive
logits), saved with `save_pretrained` and loaded by our checkpoint reader; the last-token logits
of a prefill through the EP engine (the served kernel: `torch._grouped_mm` on CUDA in bf16)
against transformers' forward; then greedy generation through the serving runtime (one rank:
scheduler, KV cache, sampling on the device) against `generate()`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_contract.plan import round_robin_plan
from moe_worker.bench.data_path import ep_prefill
from moe_worker.bench.gpu_check.device import Device
from moe_worker.bench.gpu_check.record import Recorder
from moe_worker.bench.gpu_check.world1 import greedy_tokens, serving
from moe_worker.ep.engine import EPEngine
from moe_worker.models.checkpoint import HFCheckpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network

TINY_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.15,  # larger than the default: decisive logits and routing
}


@dataclass(frozen=True)
class ParityOptions:
    prompt_lengths: tuple[int, ...] = (5, 17, 33, 64)
    new_tokens: int = 24
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    fp32_atol: float = 1e-3
    bf16_relative: float = 0.03
    """bf16: largest logit difference over the largest logit, at most this."""


GPU = ParityOptions()
TINY = ParityOptions(prompt_lengths=(5, 11), new_tokens=4, dtypes=("float32",))


def families() -> dict[str, Callable[[], Any]]:
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    return {
        "mixtral": lambda: MixtralForCausalLM(
            MixtralConfig(
                **TINY_CONFIG, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2
            )
        ),
        "qwen3_moe": lambda: Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **TINY_CONFIG, head_dim=24, intermediate_size=96, moe_intermediate_size=32,
                num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
            )
        ),
    }  # fmt: skip


def run(out: Recorder, device: Device, options: ParityOptions = GPU) -> None:
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in options.prompt_lengths]
    with tempfile.TemporaryDirectory(prefix="gpu-check-parity-") as tmp:
        for family, make in families().items():
            torch.manual_seed(0)
            hf = make().eval()
            hf.generation_config.eos_token_id = None  # whole generations are compared
            for dtype in options.dtypes:
                path = Path(tmp) / f"{family}-{dtype}"
                hf = hf.to(device.torch, getattr(torch, dtype))
                hf.save_pretrained(path)
                figures = compare(hf, path, texts, device, options, dtype)
                out.put("cases", f"{family}_{dtype}", figures)
    cases = out.data.get("cases", {})
    out.put("ok", all(case["ok"] for case in cases.values()))


def compare(
    hf: Any, path: Path, texts: list[list[int]], device: Device, o: ParityOptions, dtype: str
) -> dict[str, Any]:
    dev = device.torch
    checkpoint = HFCheckpoint(path)
    shape = checkpoint.spec.shape
    engine = EPEngine(
        checkpoint, round_robin_plan(shape.layers, shape.experts, 1, shape.experts), rank=0,
        device=dev,
    )  # fmt: skip
    with torch.inference_mode():
        ours = ep_prefill(engine, texts, dev).float()
        theirs = torch.stack([hf(torch.tensor([t], device=dev)).logits[0, -1] for t in texts])
    kernel, served_dtype = engine.kernel, str(engine.dtype).removeprefix("torch.")
    del engine
    diff = float((ours - theirs.float()).abs().max())
    scale = float(theirs.float().abs().max())
    with serving(path, device, kv_cache_tokens=2048, max_batch_tokens=256) as runtime:
        served = greedy_tokens(runtime, texts, o.new_tokens)
    generated = [_generate(hf, t, o.new_tokens, dev) for t in texts]
    equal = sum(a == b for a, b in zip(served, generated, strict=True))
    agree = [_common_prefix(a, b) for a, b in zip(served, generated, strict=True)]
    fp32 = dtype == "float32"
    logits_ok = diff <= o.fp32_atol if fp32 else diff <= o.bf16_relative * scale
    return {
        "dtype": dtype,
        "served_dtype": served_dtype,
        "kernel": kernel,
        "logits_max_abs": scale,
        "logits_max_abs_diff": diff,
        "logits_relative_diff": diff / scale,
        "prompts": len(texts),
        "generations_equal": equal,
        "mean_tokens_agreeing": sum(agree) / len(agree),
        "new_tokens": o.new_tokens,
        "ok": served_dtype == dtype and logits_ok and (equal == len(texts) or not fp32),
    }


def _generate(hf: Any, prompt: list[int], new_tokens: int, dev: torch.device) -> list[int]:
    with torch.inference_mode():
        sequence = hf.generate(
            torch.tensor([prompt], device=dev),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=dev),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in sequence[0, len(prompt) :].tolist()]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
