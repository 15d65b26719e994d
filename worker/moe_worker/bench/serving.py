"""`moe-worker bench-serving`: serving throughput and latency of moe-ep against Hugging Face
transformers' `generate()`, on the same tiny model and prompts, in one run.

The model is a tiny random Mixtral made with transformers' own classes and `save_pretrained`
(transformers is a test-only dependency: without it the bench serves a SeedMLP checkpoint of its
own and leaves the transformers rows out). moe-ep serves it at each `--worlds` size: rank 0 runs
in this process (its Backend is driven directly, no HTTP), the other ranks are `moe-worker serve`
processes, gloo on CPU with one thread each. Clients are closed loops: `c` of them, each
submitting its next request when the previous one ends. transformers runs the same prompts with
`generate()` in batches of `c` (left-padded, greedy), one thread: static batching, the way
`generate()` serves.

Reported per system and concurrency: requests/s, output tokens/s, time to first token (TTFT) and
time per output token after the first (TPOT), p50 and p99, and the ratio of moe-ep's output
tokens/s to transformers'. Greedy, no EOS: every request generates exactly `max_tokens` tokens.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_worker.launcher import free_port, spawn_rank
from moe_worker.runtime.loading import open_weights
from moe_worker.runtime.rank import Runtime
from moe_worker.serving.generation import GenerationRequest, SamplingParams, TokenEvent
from moe_worker.settings import WorkerSettings

TINY_MIXTRAL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.15,
}


@dataclass(frozen=True)
class ServingOptions:
    worlds: tuple[int, ...] = (1, 4)
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 32
    """Requests per (system, concurrency)."""
    prompt_tokens: tuple[int, int] = (8, 48)
    """Prompt lengths are drawn uniformly in this range (inclusive)."""
    max_tokens: int = 32
    seed: int = 0


@dataclass
class Timing:
    """One request: when it was sent, its first and last token, how many tokens."""

    sent: float
    first: float = 0.0
    last: float = 0.0
    tokens: int = 0
    done: threading.Event = field(default_factory=threading.Event)


def summarize(timings: list[Timing], wall: float) -> dict[str, float]:
    ttft = sorted(t.first - t.sent for t in timings)
    tpot = sorted((t.last - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else 0.0

    return {
        "requests_per_s": len(timings) / wall,
        "output_tokens_per_s": sum(t.tokens for t in timings) / wall,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "tpot_p50_s": pct(tpot, 0.5),
        "tpot_p99_s": pct(tpot, 0.99),
        "wall_s": wall,
    }


def make_prompts(o: ServingOptions, vocab: int) -> list[list[int]]:
    rng = random.Random(f"bench-serving/{o.seed}")
    low, high = o.prompt_tokens
    return [
        [rng.randrange(vocab) for _ in range(rng.randint(low, high))] for _ in range(o.requests)
    ]


# ---------------------------------------------------------------- moe-ep


def run_clients(
    runtime: Runtime, prompts: list[list[int]], concurrency: int, max_tokens: int
) -> dict[str, float]:
    """`concurrency` closed-loop clients through the leader's Backend."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    work: queue.Queue[tuple[int, list[int]]] = queue.Queue()
    for item in enumerate(prompts):
        work.put(item)
    timings: list[Timing] = []

    def client() -> None:
        while True:
            try:
                index, prompt = work.get_nowait()
            except queue.Empty:
                return
            timing = Timing(time.perf_counter())

            def sink(event: TokenEvent, t: Timing = timing) -> None:
                now = time.perf_counter()
                if event.token_ids and not t.tokens:
                    t.first = now
                if event.token_ids:
                    t.last, t.tokens = now, t.tokens + len(event.token_ids)
                if event.finish_reason is not None:
                    t.done.set()

            request = GenerationRequest(f"bench-{index}", tuple(prompt), params)
            runtime.backend.submit(request, sink)
            timing.done.wait()
            timings.append(timing)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(timings, time.perf_counter() - start)


def serve_moe_ep(
    checkpoint: Path, world: int, o: ServingOptions, prompts: list[list[int]]
) -> dict[int, dict[str, float]]:
    """A group of `world` ranks (rank 0 here) serving `checkpoint`; figures per concurrency."""
    settings = WorkerSettings(
        checkpoint=str(checkpoint),
        world_size=world,
        master_port=free_port(),
        device="cpu",
        backend="gloo",
        http_port=0,
        api_port=0,
        bind_address="127.0.0.1",
        kv_cache_tokens=4096,
        max_batch_tokens=256,
        max_queued_requests=max(o.concurrency) * 2,
    )
    one_thread = {"OMP_NUM_THREADS": "1"}  # like rank 0 here and generate(): one core each
    children = [
        spawn_rank(settings.replace(rank=r, local_rank=r), "WARNING", one_thread)
        for r in range(1, world)
    ]
    source, settings = open_weights(settings)
    runtime = Runtime(settings, source)
    loop = threading.Thread(target=runtime.run, name="bench-serving-loop")
    loop.start()
    try:
        while not runtime.backend.is_ready():
            if not loop.is_alive() or any(c.poll() is not None for c in children):
                raise SystemExit("bench-serving: the group did not start")
            time.sleep(0.05)
        run_clients(runtime, prompts[:2], 1, 4)  # warm-up
        return {c: run_clients(runtime, prompts, c, o.max_tokens) for c in o.concurrency}
    finally:
        runtime.stop()
        loop.join()
        for child in children:
            child.wait(60)


# ---------------------------------------------------------------- transformers


def run_generate(
    model: Any,
    prompts: list[list[int]],
    concurrency: int,
    max_tokens: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """`generate()` on batches of `concurrency` prompts, left-padded, greedy, on `device`."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # put() gets the prompt, then every step's new tokens
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    timings: list[Timing] = []
    start = time.perf_counter()
    for first in range(0, len(prompts), concurrency):
        wave = prompts[first : first + concurrency]
        longest = max(len(p) for p in wave)
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in wave], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in wave], device=device)
        clock, sent = Clock(), time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        tokens = len(clock.times) - 1
        timings += [Timing(sent, clock.times[1], clock.times[-1], tokens) for _ in wave]
    return summarize(timings, time.perf_counter() - start)


def tiny_mixtral(directory: Path) -> Any | None:
    """The tiny random Mixtral, saved to `directory`; None without transformers."""
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**TINY_MIXTRAL)).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    return model


def seed_checkpoint(directory: Path) -> None:
    from moe_contract.shape import ModelShape
    from moe_worker.models.checkpoint import write_checkpoint
    from moe_worker.models.weights import SyntheticWeights

    shape = ModelShape(
        layers=2,
        experts=8,
        hidden=64,
        ffn_hidden=128,
        heads=4,
        head_dim=16,
        kv_heads=2,
        vocab_size=256,
    )
    write_checkpoint(directory, SyntheticWeights.for_shape(shape, max_context=256))


# ---------------------------------------------------------------- the run


def run_serving_bench(o: ServingOptions, json_path: str | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    results: dict[str, Any] = {"options": asdict(o), "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "tiny-mixtral"
        hf = tiny_mixtral(checkpoint)
        if hf is None:
            seed_checkpoint(checkpoint)
        results["model"] = json.loads((checkpoint / "config.json").read_text())
        prompts = make_prompts(o, 256)
        for world in o.worlds:
            figures = serve_moe_ep(checkpoint, world, o, prompts)
            results["systems"][f"moe-ep world {world}"] = figures
        if hf is not None:
            run_generate(hf, prompts[:2], 1, 4)  # warm-up
            results["systems"]["transformers generate()"] = {
                c: run_generate(hf, prompts, c, o.max_tokens) for c in o.concurrency
            }
    print(format_table(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict[str, Any]) -> str:
    o, systems = results["options"], results["systems"]
    hf = systems.get("transformers generate()")
    lines = [
        f"{o['requests']} requests, prompts {o['prompt_tokens'][0]}-{o['prompt_tokens'][1]} "
        f"tokens, {o['max_tokens']} output tokens each, greedy",
        f"{'system':<26}{'conc':>5}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}"
        f"{'TPOT p50':>10}{'p99':>8}{'tok/s vs HF':>13}",
    ]
    for name, per_concurrency in systems.items():
        for c, f in per_concurrency.items():
            ratio = ""
            if hf is not None:
                ratio = f"{f['output_tokens_per_s'] / hf[c]['output_tokens_per_s']:.2f}x"
            lines.append(
                f"{name:<26}{c:>5}{f['requests_per_s']:>8.2f}{f['output_tokens_per_s']:>9.1f}"
                f"{f['ttft_p50_s'] * 1e3:>8.1f}ms{f['ttft_p99_s'] * 1e3:>6.0f}ms"
                f"{f['tpot_p50_s'] * 1e3:>8.1f}ms{f['tpot_p99_s'] * 1e3:>6.0f}ms{ratio:>13}"
            )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """`moe-worker bench-serving` and its flags."""
    p = sub.add_parser("bench-serving", help="serving throughput and latency vs transformers")
    p.add_argument("--json", dest="json_path", help="also write the figures to this file")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 4])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=[8, 48])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> int:
    options = ServingOptions(
        worlds=tuple(args.worlds),
        concurrency=tuple(args.concurrency),
        requests=args.requests,
        prompt_tokens=(args.prompt_tokens[0], args.prompt_tokens[1]),
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    run_serving_bench(options, args.json_path)
    return 0
