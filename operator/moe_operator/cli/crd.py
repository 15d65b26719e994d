"""`moe-ep crd`: print the CRD generated from the API models (what `crds/` holds)."""

from __future__ import annotations

import sys

from moe_operator.crd import render_crd_yaml


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(render_crd_yaml())
    return 0
