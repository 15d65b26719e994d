"""`moe-ep local up | down | status`: the embedded local cluster (see cluster.py, docs/local.md)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moe_local.cluster import (
    LocalCluster,
    LocalClusterConfig,
    LocalClusterError,
    default_workdir,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moe-ep local", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start control plane, node agent (and Prometheus)")
    down = commands.add_parser("down", help="stop everything; fail if anything is left")
    status = commands.add_parser("status", help="health of every component")
    for sub in (up, down, status):
        sub.add_argument(
            "--workdir",
            type=Path,
            default=default_workdir(),
            help="state, logs, pods' files (default %(default)s)",
        )
    up.add_argument("--gpus", type=int, default=16, help="nvidia.com/gpu capacity of the node")
    up.add_argument("--node-name", default="moe-local")
    up.add_argument(
        "--prometheus",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run Debian's Prometheus with the moe-ep rules (default on)",
    )
    up.add_argument("--prometheus-port", type=int, help="default: a free port")
    up.add_argument("--alert-for", help="override every alert's `for:` (e.g. 30s) locally")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command == "up":
        config = LocalClusterConfig(
            workdir=args.workdir,
            node_name=args.node_name,
            gpus=args.gpus,
            prometheus=args.prometheus,
            prometheus_port=args.prometheus_port,
            alert_for=args.alert_for,
        )
        return _up(LocalCluster(config))
    cluster = LocalCluster(LocalClusterConfig(workdir=args.workdir))
    if args.command == "down":
        left = cluster.down()
        if left:
            print("still running: " + ", ".join(left), file=sys.stderr)
            return 1
        print("local cluster stopped; nothing left running")
        return 0
    rows = cluster.status()
    for name, ok, detail in rows:
        print(f"{'ok ' if ok else 'BAD'}  {name:<26} {detail}")
    return 0 if all(ok for _, ok, _ in rows) else 1


def _up(cluster: LocalCluster) -> int:
    started = time.monotonic()
    print(f"starting the local cluster in {cluster.workdir} ...", flush=True)
    try:
        state = cluster.up(detach=True)
    except LocalClusterError as err:
        print(f"moe-ep local up: {err}", file=sys.stderr)
        return 1
    print(
        f"up in {time.monotonic() - started:.1f}s: Kubernetes v1.20.2 at {state['apiserver']}, "
        f"node {state['node']} ({cluster.config.gpus} GPUs)"
    )
    if state["prometheus"]:
        print(f"Prometheus: {state['prometheus']['url']}")
    print(f"\n  export KUBECONFIG={state['kubeconfig']}\n  kubectl get nodes\n")
    print(
        "Pods run as local processes; their logs: "
        f"{cluster.workdir}/pods/<ns>_<pod>_<uid>/logs/. Stop with: moe-ep local down"
        + ("" if cluster.workdir == default_workdir() else f" --workdir {cluster.workdir}")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
