"""Command-line flags for the model shape, shared by `moe-worker serve` and the benchmarks."""

from __future__ import annotations

import argparse

from moe_contract.shape import ARCHITECTURES

MODEL_FLAGS = {
    "layers": "layers",
    "experts": "experts",
    "hidden": "hidden",
    "ffn_hidden": "ffn-hidden",
    "heads": "heads",
    "head_dim": "head-dim",
    "top_k": "top-k",
    "kv_heads": "kv-heads",
    "vocab_size": "vocab-size",
}


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    for attr, flag in MODEL_FLAGS.items():
        parser.add_argument(f"--{flag}", dest=f"model_{attr}", type=int)
    parser.add_argument("--dtype", dest="model_dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--architecture", dest="model_architecture", choices=list(ARCHITECTURES))


def model_overrides(args: argparse.Namespace) -> dict[str, object]:
    names = [*MODEL_FLAGS, "dtype", "architecture"]
    return {
        a: getattr(args, f"model_{a}") for a in names if getattr(args, f"model_{a}") is not None
    }
