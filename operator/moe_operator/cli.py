"""`moe-ep`: the user's command line. Each sub-command lives in its own module; this only routes.

moe-ep plan    preview a rebalancing plan from per-expert loads (same document workers accept)
moe-ep perf    performance model of a layout on a hardware profile
moe-ep crd     print the MoEDeployment CRD generated from the API models
moe-ep local   up | down | status of the embedded local cluster
moe-ep demo    the whole loop on the local cluster, with live progress
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "plan": "moe_operator.planning.plan_cli",
    "perf": "moe_operator.planning.perf_cli",
    "crd": "moe_operator.crd_cli",
    "local": "moe_operator.local.cli",
    "demo": "moe_operator.local.demo",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        sys.stderr.write(__doc__ or "")
        return 0 if args and args[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[args[0]])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
