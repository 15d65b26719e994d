"""`moe-worker`: `serve` (default) runs one rank; `bench` compares EP with TP x PP on this machine.

Settings come from the environment the operator sets (`moe_worker.env`); flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from moe_worker.settings import WorkerSettings, settings_from_env
from moe_worker.shape import ModelShape

_MODEL_FLAGS = {
    "layers": "layers",
    "experts": "experts",
    "hidden": "hidden",
    "ffn_hidden": "ffn-hidden",
    "heads": "heads",
    "head_dim": "head-dim",
    "top_k": "top-k",
}
_SETTINGS_FLAGS: dict[str, tuple[str, type]] = {
    "rank": ("rank", int),
    "world_size": ("world-size", int),
    "master_addr": ("master-addr", str),
    "master_port": ("master-port", int),
    "backend": ("backend", str),
    "device": ("device", str),
    "plan_path": ("plan", str),
    "token_path": ("token-file", str),
    "http_port": ("http-port", int),
    "bind_address": ("bind", str),
    "seed": ("seed", int),
    "checkpoint": ("checkpoint", str),
    "slots_per_rank": ("slots-per-rank", int),
    "switch_timeout": ("switch-timeout", float),
}
_TRAFFIC_FLAGS: dict[str, tuple[str, type]] = {
    "batch": ("traffic-batch", int),
    "seq_len": ("traffic-seq-len", int),
    "zipf": ("zipf", float),
    "interval": ("traffic-interval", float),
}


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    for attr, flag in _MODEL_FLAGS.items():
        parser.add_argument(f"--{flag}", dest=f"model_{attr}", type=int)
    parser.add_argument("--dtype", dest="model_dtype", choices=["float32", "bfloat16", "float16"])


def _model_overrides(args: argparse.Namespace, base: ModelShape) -> ModelShape:
    changes = {
        attr: getattr(args, f"model_{attr}")
        for attr in [*_MODEL_FLAGS, "dtype"]
        if getattr(args, f"model_{attr}") is not None
    }
    return dataclasses.replace(base, **changes)


def serve_settings(args: argparse.Namespace) -> WorkerSettings:
    """Environment first, flags on top."""
    base = settings_from_env()
    changes = {a: getattr(args, a) for a in _SETTINGS_FLAGS if getattr(args, a) is not None}
    traffic = {
        a: getattr(args, f"traffic_{a}")
        for a in _TRAFFIC_FLAGS
        if getattr(args, f"traffic_{a}") is not None
    }
    return dataclasses.replace(
        base,
        **changes,
        model=_model_overrides(args, base.model),
        traffic=dataclasses.replace(base.traffic, **traffic) if traffic else base.traffic,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-worker", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run one rank (settings from MOE_* env, flags override)")
    for attr, (flag, kind) in _SETTINGS_FLAGS.items():
        serve.add_argument(f"--{flag}", dest=attr, type=kind)
    for attr, (flag, kind) in _TRAFFIC_FLAGS.items():
        serve.add_argument(f"--{flag}", dest=f"traffic_{attr}", type=kind)
    _add_model_flags(serve)
    bench = sub.add_parser("bench", help="EP vs TP x PP on this machine, one invocation")
    bench.add_argument("--json", dest="json_path", help="also write the figures to this file")
    bench.add_argument("--world", type=int, default=4)
    bench.add_argument("--tp", type=int, help="tensor parallel of the baseline (default world/pp)")
    bench.add_argument("--pp", type=int, default=2, help="pipeline stages of the baseline")
    bench.add_argument("--batch", type=int, default=8, help="sequences per step (whole world)")
    bench.add_argument("--seq-len", type=int, default=128)
    bench.add_argument("--steps", type=int, default=5)
    bench.add_argument("--micro-batches", type=int, default=4)
    bench.add_argument("--zipf", type=float, default=0.0)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--port", type=int, default=0, help="rendezvous port (0: a free one)")
    _add_model_flags(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "bench":
        from moe_worker.bench import BenchOptions, run_bench

        options = BenchOptions(
            model=_model_overrides(args, BenchOptions().model),
            world=args.world,
            pp=args.pp,
            tp=args.tp or max(1, args.world // args.pp),
            batch=args.batch,
            seq_len=args.seq_len,
            steps=args.steps,
            micro_batches=args.micro_batches,
            zipf=args.zipf,
            seed=args.seed,
            port=args.port,
        )
        run_bench(options, json_path=args.json_path)
        return 0
    if args.command is None:  # `moe-worker` alone means serve with the environment's settings
        args = build_parser().parse_args(["serve"])
    from moe_worker.process import serve

    return serve(serve_settings(args))


if __name__ == "__main__":
    sys.exit(main())
