"""What one maximal request costs the ranks that do not keep it (issue 19, item 1), printed as
docs/performance.md's table: 2 forked gloo ranks serve a synthetic model; each round submits the
largest request the API admits (64 prompts of 64 tokens, 256 stop token ids each) and a small
greedy request right behind it. Rank 1 counts the bytes that reach it: the step descriptors
broadcast to every rank, and the admissions sent to it alone (where the code has them).

`--before DIR` measures the code of another checkout first (DIR/worker and DIR/contract on the
path), e.g. `git worktree add /tmp/main-code main`. Spawns processes: run it under the lock,
`flock /tmp/moe-heavy.lock .venv/bin/python -m tests.perf.admission_bytes --before /tmp/main-code`.
A measurement script, not a test (pytest does not collect it)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROUNDS = 5
PROMPTS, PROMPT_TOKENS, STOP_IDS, VOCAB = 64, 64, 256, 32000
STOPS = tuple(range(VOCAB - STOP_IDS, VOCAB))
"""The vocabulary's last ids: five digits each, as in a real tokenizer's range."""


def submit(backend: Any, request_id: str, prompt: tuple[int, ...], params: Any) -> threading.Event:
    from moe_worker.serving.generation import GenerationRequest

    done = threading.Event()

    def sink(event: Any) -> None:
        if event.finish_reason is not None:
            done.set()

    backend.submit(GenerationRequest(request_id, prompt, params), sink)
    return done


def lead(driver: Any) -> dict[str, Any]:
    """Rank 0: the small request alone, then behind a maximal one, ROUNDS times each."""
    from moe_worker.serving.generation import SamplingParams

    small = ((5, 6, 7), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    large = SamplingParams(temperature=0.8, seed=1, max_tokens=4, stop_token_ids=STOPS)
    alone, beside = [], []
    for turn in range(ROUNDS):
        start = time.perf_counter()
        assert submit(driver.backend, f"alone-{turn}", *small).wait(120)
        alone.append(time.perf_counter() - start)
        waits = [
            submit(driver.backend, f"max-{turn}-{i}", tuple(range(i, i + PROMPT_TOKENS)), large)
            for i in range(PROMPTS)
        ]
        start = time.perf_counter()
        assert submit(driver.backend, f"small-{turn}", *small).wait(120)
        beside.append(time.perf_counter() - start)
        assert all(done.wait(120) for done in waits)
    return {"alone": alone, "beside": beside}


def measuring_rank(rank: int, world: int) -> dict[str, Any]:
    """Serve; every descriptor and admission text that reaches this rank is counted."""
    from moe_contract.shape import ModelShape
    from moe_worker.ep import group
    from moe_worker.settings import WorkerSettings
    from tests.worker.worker_serving_cases import serve_group

    texts: dict[str, list[str]] = {"broadcast": [], "received": []}

    def counting(name: str, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> str:
            text = original(*args, **kwargs)
            texts[name].append(text)
            return str(text)

        return call

    group.broadcast_text = counting("broadcast", group.broadcast_text)
    if hasattr(group, "recv_text"):  # the admissions sent to their owner alone
        group.recv_text = counting("received", group.recv_text)
    shape = ModelShape(
        layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, vocab_size=VOCAB
    )
    settings = WorkerSettings(
        model=shape, seed=1, kv_cache_tokens=8192, max_batch_tokens=512, max_queued_requests=200
    )
    return {**serve_group(rank, world, settings, lead), **texts}


def _admissions(descriptor: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(request id, owner, bytes) of each admission in a descriptor: a whole sequence (before)
    or its id and rank (after)."""
    out = []
    for item in descriptor["admit"]:
        rid, owner = (item["request_id"], item["rank"]) if isinstance(item, dict) else item
        out.append((rid, owner, len(json.dumps(item, separators=(",", ":")))))
    return out


def wire(size: int) -> int:
    """Bytes a text of `size` moves: the fixed frame, and the rest beyond it."""
    from moe_worker.ep.group import INLINE_BYTES

    return INLINE_BYTES + max(0, size + 8 - INLINE_BYTES)


def row(label: str) -> str:
    from tests.worker.worker_harness import run_world

    leader, other = run_world(measuring_rank, 2, Path(tempfile.mkdtemp()), timeout=600)
    steps_seen = [(t, json.loads(t)) for t in other["broadcast"] if t.startswith('{"step":')]
    descriptors = [d for _, d in steps_seen]
    admitting = [t for t, d in steps_seen if d["admit"]]
    quiet = [len(t) for t, d in steps_seen if not d["admit"]]
    maximal = [a for d in descriptors for a in _admissions(d) if a[0].startswith("max-")]
    not_mine = sum(size for _, owner, size in maximal if owner != 1) // ROUNDS
    mine = sum(len(t) for t in other["received"]) // ROUNDS
    steps = sum(len(t) for t in admitting) // ROUNDS
    return (
        f"| {label} | {not_mine:,} B | {mine:,} B | {max(map(len, admitting)):,} B "
        f"({max(wire(len(t)) for t in admitting):,} B on the wire) | {steps:,} B in "
        f"{len(admitting) // ROUNDS} | {statistics.median(quiet):,.0f} B | "
        f"{statistics.median(leader['alone']) * 1e3:.1f} ms | "
        f"{statistics.median(leader['beside']) * 1e3:.1f} ms |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another checkout to measure first")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(row(args.one), flush=True)
        return
    print(
        "| code | rank 1 receives of rank 0's sequences | rank 1's own admissions, sent to it "
        "| largest step descriptor | descriptors of admitting steps | a step's descriptor "
        "otherwise | small request alone | beside the maximal one |"
    )
    print("|---|---|---|---|---|---|---|---|")
    runs = [("this checkout", None)]
    if args.before is not None:
        runs.insert(0, (f"before ({args.before.name})", args.before.resolve()))
    for label, code in runs:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if code is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(code / "worker"), str(code / "contract")])
        command = [sys.executable, "-m", "tests.perf.admission_bytes", "--one", label]
        subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
