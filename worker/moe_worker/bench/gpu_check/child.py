"""One part of the gpu-check in a process of its own (`check.run_part` starts it): a CUDA fault,
an out-of-memory or a hang ends this process, not the check, and the figures it recorded stay.

    python -m moe_worker.bench.gpu_check.child MODULE FIGURES_JSON [--device cuda|cpu|none]
                                                [--tiny]

MODULE (or MODULE:FUNCTION) has `run(out, device, options)` and `GPU` and `TINY` options
(`--device none` passes no device and imports no torch: the runner's own tests). The figures go to
FIGURES_JSON as they come; how the part ended goes to FIGURES_JSON with the suffix
`.status.json`: {"status": "ok" | "error", "error": ..., "traceback": ...}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path


def status_path(figures: Path) -> Path:
    return figures.with_name(figures.name + ".status.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_worker.bench.gpu_check.child")
    parser.add_argument("module")
    parser.add_argument("figures", type=Path)
    parser.add_argument("--device", choices=("cuda", "cpu", "none"), default="cuda")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ended: dict[str, object] = {"status": "ok"}
    try:
        from moe_worker.bench.gpu_check.record import Recorder

        out = Recorder(args.figures)
        out.flush()
        module, _, function = args.module.partition(":")
        part = importlib.import_module(module)
        device = None
        if args.device != "none":
            from moe_worker.bench.gpu_check.device import Device

            device = Device(args.device)
        getattr(part, function or "run")(out, device, part.TINY if args.tiny else part.GPU)
    except Exception as error:
        traceback.print_exc()
        ended = {
            "status": "error",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()[-4000:],
        }
    ended["seconds"] = time.perf_counter() - start
    status_path(args.figures).write_text(json.dumps(ended))
    return 0 if ended["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
