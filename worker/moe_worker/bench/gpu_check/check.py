"""`python -m moe_worker.bench.gpu_check` (`make gpu-check`): every GPU path moe-ep has, in one
run of under 8 minutes on one H100/H200, to one JSON and one Markdown table.

It prints what it found (GPU, torch, CUDA, NCCL, transformers) and refuses without CUDA (exit
code 3, nothing measured). Then each part runs in a process of its own under its own time budget
(`PARTS`), so a failure, a CUDA fault or a hang costs that part alone and the others' figures
stand; a part stopped at its budget keeps what it recorded before. The whole run also keeps to
`--deadline` seconds. Exit code 0 when every part ran and passed its checks, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from moe_worker.bench.gpu_check import report
from moe_worker.bench.gpu_check.child import status_path

NO_CUDA = 3


@dataclass(frozen=True)
class Part:
    key: str
    """The issue's letter: (a) to (f)."""
    name: str
    module: str
    budget_s: float
    title: str


def _part(key: str, name: str, budget_s: float, title: str) -> Part:
    return Part(key, name, f"moe_worker.bench.gpu_check.{name}", budget_s, title)


# Run in this order: correctness and the figures `moe-ep perf` takes first, the longest last.
PARTS = (
    _part("a", "parity", 75, "Mixtral and Qwen3-MoE at world 1 against transformers"),
    _part("b", "grouped", 100, "grouped GEMM against the per-slot loop and dense cuBLAS"),
    _part("e", "overlap", 60, "two-batch overlap, links emulated on a second stream"),
    _part("d", "switch", 45, "background plan switch pause against a decode step"),
    _part("f", "memory", 30, "the free-memory check behind slot growth"),
    _part("c", "serving", 130, "serving at world 1 against transformers generate()"),
)
DEADLINE_S = 450.0
"""The whole run's parts (7.5 minutes); start-up and the report take seconds."""


def run_part(part: Part, workdir: Path, budget_s: float, device: str, tiny: bool) -> dict[str, Any]:
    """`part` in a child process, stopped (its whole process group) after `budget_s`."""
    figures_path = workdir / f"{part.name}.json"
    command = [sys.executable, "-m", "moe_worker.bench.gpu_check.child", part.module]
    command += [str(figures_path), "--device", device] + (["--tiny"] if tiny else [])
    start = time.monotonic()
    child = subprocess.Popen(command, start_new_session=True)
    try:
        code: int | None = child.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        code = None
    result: dict[str, Any] = {
        "key": part.key,
        "title": part.title,
        "budget_s": budget_s,
        "seconds": time.monotonic() - start,
        "figures": _read(figures_path) or {},
    }
    ended = _read(status_path(figures_path))
    if code is None:
        result.update(status="timeout", error=f"stopped at its budget of {budget_s:.0f} s")
    elif ended is None:
        result.update(status="crashed", error=f"the part's process ended with exit code {code}")
    else:
        result.update({k: v for k, v in ended.items() if k != "seconds"})
    return result


def run_parts(
    parts: Sequence[Part], deadline_s: float, device: str, tiny: bool
) -> dict[str, dict[str, Any]]:
    """Every part in turn, each within min(its budget, what the deadline leaves)."""
    start, results = time.monotonic(), {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        for part in parts:
            left = deadline_s - (time.monotonic() - start)
            if left < 5:
                results[part.name] = {
                    "key": part.key,
                    "title": part.title,
                    "status": "skipped",
                    "error": f"the run's deadline of {deadline_s:.0f} s left no time",
                }
                continue
            budget = min(part.budget_s, left)
            print(f"== ({part.key}) {part.name}: {part.title} (budget {budget:.0f} s)", flush=True)
            result = run_part(part, Path(workdir), budget, device, tiny)
            print(f"== ({part.key}) {part.name}: {result['status']} in {result['seconds']:.1f} s "
                  f"{result.get('error', '')}", flush=True)  # fmt: skip
            results[part.name] = result
    return results


def select(names: str | None) -> list[Part]:
    """Parts by letter or name, comma-separated; all of them for None."""
    if not names:
        return list(PARTS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {p.key: p for p in PARTS} | {p.name: p for p in PARTS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        choices = ", ".join(f"{p.key}/{p.name}" for p in PARTS)
        raise ValueError(f"--parts: unknown {', '.join(unknown)}; choose from {choices}")
    return [p for p in PARTS if p in {known[n] for n in wanted}]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moe_worker.bench.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("out/gpu-check"), help="folder for "
                        "gpu-check.json and gpu-check.md (default out/gpu-check)")  # fmt: skip
    parser.add_argument("--parts", help="comma-separated letters or names (default: all)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for all parts")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a quick look, no figures")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda",
        help="cpu runs the tiny sizes on the CPU (tries the pipeline; needs --tiny)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from moe_worker.bench.gpu_check.device import describe

    environment = describe()
    print("gpu-check found: " + ", ".join(f"{k} {v}" for k, v in environment.items()), flush=True)
    if args.device == "cuda" and not environment["cuda_available"]:
        print(
            "gpu-check needs a CUDA GPU and found none (torch.cuda.is_available() is False, "
            f"torch {environment['torch']}); nothing was measured. Run it on a GPU machine "
            "(docs/gpu-results.md, 'How to run').",
            file=sys.stderr,
        )
        return NO_CUDA
    if args.device == "cpu" and not args.tiny:
        print("gpu-check: --device cpu runs only the tiny sizes; add --tiny", file=sys.stderr)
        return 2
    try:
        parts = select(args.parts)
    except ValueError as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        return 2
    started = datetime.now(UTC)
    results = run_parts(parts, args.deadline, args.device, args.tiny)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": (datetime.now(UTC) - started).total_seconds(),
        "command": " ".join(["python -m moe_worker.bench.gpu_check", *(argv or sys.argv[1:])]),
        "tiny": args.tiny,
    }
    document = report.document(environment, results, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(document, indent=2) + "\n")
    table = report.markdown(document)
    (args.out / "gpu-check.md").write_text(table)
    print(table)
    return 0 if report.all_ok(document) else 1


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
