"""Availability of replica groups behind the router on the local cluster (docs/api.md,
"Availability"): requests failed and wrong during a template change, a kill -9 of one group's
leader, scale 2 -> 1 and 1 -> 2, and the seconds until a new group takes traffic.

    flock /tmp/moe-heavy.lock .venv/bin/python hack/measure_availability.py --trials 3

Each trial runs every event in sequence on one deployment of 2 groups x 2 ranks
(`moe_local.availability`) under a steady load of greedy requests through the router; the table
has one row per event and trial.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from moe_local import availability, install
from moe_local.cluster import LocalCluster, LocalClusterConfig
from moe_local.controlplane import ensure_binaries

NAMESPACE = "avail"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="clients, one request each")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = parser.parse_args()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="moe-avail-"))
    cluster = LocalCluster(
        LocalClusterConfig(workdir=workdir, bin_dir=ensure_binaries(), gpus=8, prometheus=False)
    )
    cluster.up(detach=args.keep)
    try:
        cluster.create_namespace(install.SYSTEM_NAMESPACE)
        cluster.create_namespace(NAMESPACE)
        install.helm_install(cluster.kubeconfig, install.operator_values(timer_seconds=1))
        models = workdir / "models"
        availability.write_checkpoint(models)
        install.wait_until(lambda: install.operator_ready(cluster.kubeconfig), 120, "operator")
        install.apply_document(cluster.kubeconfig, NAMESPACE, availability.deployment(models))
        run = availability.Availability(
            cluster.kubeconfig, cluster.client(), NAMESPACE, concurrency=args.concurrency
        )
        run.start_load()
        print(f"[avail] up and loaded in {time.monotonic() - started:.0f}s ({workdir})")
        rows = []
        for trial in range(args.trials):
            rows += [(trial, event) for event in run.run_all(trial)]
        answers = run.stop_load()
        print(f"\n{len(answers)} requests in all, {sum(not a.ok for a in answers)} failed\n")
        print(
            availability.HEADER.replace("| event |", "| trial | event |").replace(
                "|---|", "|---|---|", 1
            )
        )
        for trial, event in rows:
            print(f"| {trial + 1} {event.row()}")
        return 0 if all(e.failed == 0 and e.wrong == 0 for _, e in rows) else 1
    finally:
        if args.keep:
            print(
                f"cluster kept: KUBECONFIG={cluster.kubeconfig}; "
                f"moe-ep local down --workdir {workdir}"
            )
        else:
            left = cluster.down()
            if left:
                print(f"processes left behind: {left}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
