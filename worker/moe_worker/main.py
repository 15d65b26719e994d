"""`moe-worker`: `serve` (default) runs one rank, or with `--world N` and no rank in the environment
all N ranks on this machine; `bench` compares EP with TP x PP; `bench-serving` measures serving.

Settings come from the environment the operator sets (`moe_contract.env`); flags override them,
except in a pod (`MOE_POD_NAME` set), where a flag may not change what the operator owns or the
environment sets: the worker refuses to start and names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from moe_contract import env
from moe_worker.flags import MODEL_FLAGS, add_model_flags, model_overrides
from moe_worker.settings import (
    SETTING_VARIABLES,
    TRAFFIC_VARIABLES,
    WorkerSettings,
    boolean,
    rank_from_env,
    runs_pod_ranks,
    settings_from_env,
)

COMMANDS_ENTRY_POINT_GROUP = "moe_worker.commands"
"""Entry points of the sub-commands besides serve (`moe-worker bench`, `bench-serving`)."""

_SETTINGS_FLAGS: dict[str, tuple[tuple[str, ...], Callable[[str], Any]]] = {
    "world_size": (("world-size", "world"), int),
    "master_addr": (("master-addr",), str),
    "master_port": (("master-port",), int),
    "backend": (("backend",), str),
    "device": (("device",), str),
    "plan_path": (("plan",), str),
    "token_path": (("token-file",), str),
    "http_port": (("http-port",), int),
    "bind_address": (("bind",), str),
    "seed": (("seed",), int),
    "checkpoint": (("checkpoint",), str),
    "slots_per_rank": (("slots-per-rank",), int),
    "max_slots_per_rank": (("max-slots-per-rank",), int),
    "switch_timeout": (("switch-timeout",), float),
    "background_switch": (("background-switch",), boolean),
    "two_batch_overlap": (("two-batch-overlap",), boolean),
    "kv_cache_tokens": (("kv-cache-tokens",), int),
    "max_batch_tokens": (("max-batch-tokens",), int),
    "max_queued_requests": (("max-queued-requests",), int),
    "api_port": (("api-port",), int),
    "api_keys_path": (("api-keys-file",), str),
    "served_model_name": (("served-model-name",), str),
    "stall_timeout": (("stall-timeout",), float),
    "collective_timeout": (("collective-timeout",), float),
}
_TRAFFIC_FLAGS: dict[str, str] = {
    "batch": "traffic-batch",
    "seq_len": "traffic-seq-len",
    "zipf": "zipf",
    "interval": "traffic-interval",
    "max_tokens": "traffic-max-tokens",
}


def _given_flags(args: argparse.Namespace) -> dict[str, str]:
    """--flag -> the variable it would override, for every flag given."""
    given = {}
    if args.rank is not None:
        given["--rank"] = env.RANK
    for attr, (flags, _) in _SETTINGS_FLAGS.items():
        if getattr(args, attr) is not None:
            given[f"--{flags[0]}"] = SETTING_VARIABLES[attr][0]
    for attr, flag in _TRAFFIC_FLAGS.items():
        if getattr(args, f"traffic_{attr}") is not None:
            given[f"--{flag}"] = TRAFFIC_VARIABLES[attr][0]
    for attr in model_overrides(args):
        given[f"--{MODEL_FLAGS.get(attr, attr).replace('_', '-')}"] = env.SHAPE_VARIABLES[attr]
    return given


class FlagRefused(ValueError):
    """A flag that would override what the operator sets on a pod."""


def check_pod_flags(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """In a pod only `env.USER_FLAGS` may be given, and none whose variable the environment sets:
    the rest is the operator's (identity, group, ports, model, checkpoint, plan and token)."""
    if not environ.get(env.POD_NAME):
        return
    for flag, name in _given_flags(args).items():
        if flag not in env.USER_FLAGS or environ.get(name):
            allowed = ", ".join(sorted(env.USER_FLAGS))
            raise FlagRefused(
                f"{flag} may not override {name} in a pod: the operator sets it through the "
                f"environment (spec.worker.extraArgs may set only {allowed})"
            )


def serve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerSettings:
    """Environment first, flags on top."""
    base = settings_from_env(environ)
    changes: dict[str, object] = {
        a: getattr(args, a) for a in _SETTINGS_FLAGS if getattr(args, a) is not None
    }
    if args.rank is not None:
        changes["rank"] = args.rank
    traffic = {
        a: getattr(args, f"traffic_{a}")
        for a in _TRAFFIC_FLAGS
        if getattr(args, f"traffic_{a}") is not None
    }
    shape = model_overrides(args)
    return dataclasses.replace(
        base,
        **changes,
        model=base.model.replace(**shape),
        declared_shape=base.declared_shape | frozenset(shape),
        traffic=dataclasses.replace(base.traffic, **traffic),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-worker", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser(
        "serve", help="run one rank, or all ranks of --world N here when no rank is given"
    )
    serve.add_argument("--rank", type=int)
    for attr, (flags, kind) in _SETTINGS_FLAGS.items():
        serve.add_argument(*(f"--{f}" for f in flags), dest=attr, type=kind)
    for attr, flag in _TRAFFIC_FLAGS.items():
        kind = TRAFFIC_VARIABLES[attr][1]
        serve.add_argument(f"--{flag}", dest=f"traffic_{attr}", type=kind)
    add_model_flags(serve)
    # Benchmarks register themselves (entry points), so the serving product never imports them.
    for point in entry_points(group=COMMANDS_ENTRY_POINT_GROUP):
        importlib.import_module(point.value).add_parser(sub)
    return parser


def run_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from moe_worker.process import report_fatal, serve

    try:
        check_pod_flags(args, environ)
        settings = serve_settings(args, environ)
    except ValueError as error:
        path = environ.get(env.TERMINATION_MESSAGE_PATH) or env.TERMINATION_MESSAGE_FILE
        return report_fatal(str(error), path)
    if args.rank is None and runs_pod_ranks(environ):
        from moe_worker.launcher import launch_pod

        return launch_pod(settings, args.log_level)
    if args.rank is None and rank_from_env(environ) is None and settings.world_size > 1:
        from moe_worker.launcher import LocalRanks, free_port, launch

        if args.master_port is None and not environ.get(env.MASTER_PORT):
            settings = settings.replace(master_port=free_port())
        return launch(settings, LocalRanks(settings.world_size), args.log_level)
    return serve(settings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:  # `moe-worker` alone means serve with the environment's settings
        args = parser.parse_args([*(sys.argv[1:] if argv is None else argv), "serve"])
    if args.command == "serve":
        return run_serve(args, os.environ)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
