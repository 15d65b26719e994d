"""Command-line flags for the model shape, shared by `moe-worker serve` and the benchmarks.

The shape travels in its own variables (`moe_contract.env.SHAPE_VARIABLES`); with a checkpoint,
the fields given must equal its config.json's and the others come from it.
"""

from __future__ import annotations

import argparse

from moe_contract.env import SHAPE_VARIABLES
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
MODEL_HELP = {
    "layers": "transformer layers, each with an MoE block",
    "experts": "logical experts in every layer",
    "hidden": "token (model) dimension",
    "ffn_hidden": "hidden dimension of each expert",
    "heads": "attention heads per layer",
    "head_dim": "dimension of each attention head",
    "top_k": "experts each token is routed to",
    "kv_heads": "key/value heads (grouped-query attention); none: as many as heads",
    "vocab_size": "token vocabulary",
    "dtype": "weight and activation precision",
    "architecture": "model family",
}


def _help(attr: str) -> str:
    return f"{MODEL_HELP[attr]} [{SHAPE_VARIABLES[attr]}]"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    for attr, flag in MODEL_FLAGS.items():
        parser.add_argument(
            f"--{flag}", dest=f"model_{attr}", type=int, metavar="N", help=_help(attr)
        )
    parser.add_argument(
        "--dtype",
        dest="model_dtype",
        choices=["float32", "bfloat16", "float16"],
        help=_help("dtype"),
    )
    parser.add_argument(
        "--architecture",
        dest="model_architecture",
        choices=list(ARCHITECTURES),
        help=_help("architecture"),
    )


def model_overrides(args: argparse.Namespace) -> dict[str, object]:
    names = [*MODEL_FLAGS, "dtype", "architecture"]
    return {
        a: getattr(args, f"model_{a}") for a in names if getattr(args, f"model_{a}") is not None
    }
