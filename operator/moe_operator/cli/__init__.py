"""`moe-ep`: the user's command line. Each sub-command is a module with `main(argv) -> int`.

moe-ep plan        preview a rebalancing plan from per-expert loads (same document workers accept)
moe-ep perf        performance model of a layout on a hardware profile
moe-ep crd         print the MoEDeployment CRD generated from the API models
moe-ep render      print the objects the operator would create for a MoEDeployment file (no cluster)
moe-ep zipf-table  imbalance before and after one Auto step under Zipf loads (for the docs)

Other distributions add sub-commands through the entry-point group `moe_ep.commands` (name: the
sub-command, value: its module); the local tooling (`moe-ep-local`, in local/) adds
`moe-ep local up|down|status`, `moe-ep demo`, `moe-ep gating-sim` (what GatingBias buys and
costs, with the worker's router and this planner), `moe-ep planner-bench` (Replace against EPLB
at DeepSeek scale) and `moe-ep operator-bench` (a control step against many fake ranks).
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "moe_ep.commands"
COMMANDS = {
    "plan": "moe_operator.cli.plan",
    "perf": "moe_operator.cli.perf",
    "crd": "moe_operator.cli.crd",
    "render": "moe_operator.cli.render",
    "zipf-table": "moe_operator.cli.zipf_table",
}
PROVIDED_ELSEWHERE = {
    name: "moe-ep-local"
    for name in ("local", "demo", "gating-sim", "planner-bench", "operator-bench")
}
"""Commands of other distributions, named so a missing one gets a useful message."""


def commands() -> dict[str, str]:
    """Sub-command -> module, the built-in ones and those other distributions register."""
    found = {point.name: point.value for point in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **COMMANDS}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    known = commands()
    if not args or args[0] in ("-h", "--help"):
        sys.stderr.write(__doc__ or "")
        return 0 if args else 2
    if args[0] not in known:
        if args[0] in PROVIDED_ELSEWHERE:
            sys.stderr.write(
                f"moe-ep {args[0]}: comes with the {PROVIDED_ELSEWHERE[args[0]]} distribution; "
                "install it with `pip install -e ./local` from a checkout (make setup does)\n"
            )
        else:
            sys.stderr.write(f"moe-ep: unknown command {args[0]!r}\n\n{__doc__}")
        return 2
    module = importlib.import_module(known[args[0]])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
