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
from moe_contract.settings import USER, USER_FLAGS, WORKER_SETTINGS, Setting
from moe_worker.flags import MODEL_FLAGS, add_model_flags, model_overrides
from moe_worker.settings import (
    WorkerSettings,
    field_name,
    rank_from_env,
    runs_pod_ranks,
    settings_from_env,
)

COMMANDS_ENTRY_POINT_GROUP = "moe_worker.commands"
"""Entry points of the sub-commands besides serve (`moe-worker bench`, `bench-serving`)."""

FLAGGED = tuple(setting for setting in WORKER_SETTINGS if setting.flags)
"""The settings `moe-worker serve` has flags for."""


def _given_flags(args: argparse.Namespace) -> dict[str, str]:
    """--flag -> the variable it would override, for every flag given."""
    given = {}
    if args.rank is not None:
        given["--rank"] = env.RANK
    for setting in FLAGGED:
        if getattr(args, setting.dest) is not None:
            given[setting.flags[0]] = setting.variable
    for attr in model_overrides(args):
        given[f"--{MODEL_FLAGS.get(attr, attr).replace('_', '-')}"] = env.SHAPE_VARIABLES[attr]
    return given


class FlagRefused(ValueError):
    """A flag that would override what the operator sets on a pod."""


def check_pod_flags(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """In a pod only `USER_FLAGS` may be given, and none whose variable the environment sets:
    the rest is the operator's (identity, group, ports, model, checkpoint, plan and token)."""
    if not environ.get(env.POD_NAME):
        return
    for flag, name in _given_flags(args).items():
        if flag not in USER_FLAGS or environ.get(name):
            allowed = ", ".join(sorted(USER_FLAGS))
            raise FlagRefused(
                f"{flag} may not override {name} in a pod: the operator sets it through the "
                f"environment (spec.worker.extraArgs may set only {allowed})"
            )


def serve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerSettings:
    """Environment first, flags on top."""
    base = settings_from_env(environ)
    changes: dict[str, object] = {}
    traffic: dict[str, object] = {}
    for setting in FLAGGED:
        value = getattr(args, setting.dest)
        if value is not None:
            owner = traffic if setting.name.startswith("traffic.") else changes
            owner[field_name(setting)] = value
    if args.rank is not None:
        changes["rank"] = args.rank
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
        "serve",
        help="run one rank, or all ranks of --world N here when no rank is given",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--rank",
        type=int,
        metavar="N",
        help=f"this process's rank [{env.RANK}; in a pod: its ordinal x ranks per pod]; none "
        "with --world N > 1: start all N ranks here",
    )
    for setting in FLAGGED:
        serve.add_argument(
            *setting.flags,
            dest=setting.dest,
            type=_flag_type(setting),
            metavar=_METAVARS.get(setting.parse.__name__, "VALUE"),
            help=_flag_help(setting),
        )
    add_model_flags(serve)
    # Benchmarks register themselves (entry points), so the serving product never imports them.
    for point in entry_points(group=COMMANDS_ENTRY_POINT_GROUP):
        importlib.import_module(point.value).add_parser(sub)
    return parser


def run_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from moe_worker.process import exit_now, report_fatal, serve

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
    code = serve(settings)
    exit_now(code)
    return code


SERVE_HELP = """\
Serve one rank of the group (or, with --world N and no rank given, all N ranks on
this machine). Settings come from the MOE_* environment, as the operator sets it
on pods; a flag overrides its variable, except in a pod, where only the flags
marked "extraArgs" (what a MoEDeployment's worker.extraArgs may set) are
accepted, and none whose variable the environment sets."""
_METAVARS = {"int": "N", "float": "NUMBER", "str": "TEXT", "boolean": "BOOL"}


def _flag_type(setting: Setting) -> Callable[[str], Any]:
    """The setting's reader for argparse: its message, not argparse's "invalid int value" (the
    operator refuses the same values of `worker.extraArgs` with the same reader)."""

    def read(text: str) -> Any:
        try:
            return setting.read(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    read.__name__ = setting.parse.__name__
    return read


def _flag_help(setting: Setting) -> str:
    user = "; extraArgs" if setting.pod == USER else ""
    text = f"{setting.help} [{setting.variable}; default {_shown(setting.default)}{user}]"
    return text.replace("%", "%%")  # argparse formats help with %


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


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
