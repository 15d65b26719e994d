"""`moe-operator`: run the kopf operator with moe-ep's handlers, health and metrics endpoints."""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf
from prometheus_client import start_http_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moe-operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--all-namespaces",
        action="store_true",
        default=True,
        help="watch MoEDeployments in every namespace (default)",
    )
    scope.add_argument(
        "--namespace", action="append", default=[], help="watch only this namespace (repeatable)"
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=8081,
        help="port of the /healthz endpoint for liveness and readiness probes",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="port of the Prometheus /metrics endpoint; 0 disables it",
    )
    parser.add_argument(
        "--bind-address",
        default="127.0.0.1",
        help="address the health and metrics endpoints listen on (in a pod: its IP, which the "
        "chart passes; the loopback default keeps local runs private and apart)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from moe_operator import handlers, podevents  # noqa: F401  (registers them with kopf)

    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.bind_address)
    host = f"[{args.bind_address}]" if ":" in args.bind_address else args.bind_address
    asyncio.run(
        kopf.operator(
            standalone=True,  # one replica; no peering resources to grant
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=f"http://{host}:{args.liveness_port}/healthz",
        )
    )


if __name__ == "__main__":
    main()
