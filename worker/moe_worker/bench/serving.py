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
tokens/s to transformers'. Greedy, no EOS: every request generates exactly its `max_tokens`.

`--workload realistic` is traffic as it comes: a mid-size random Mixtral (hidden 512, 8 experts,
4 layers, vocabulary 8k), prompts of 16-512 tokens and outputs of 8-256 (each request its own),
16 and 64 closed-loop clients, three runs. `generate()` serves them in static batches, each
batch running until its longest output is done (the others' tokens keep being computed and
are not counted); moe-ep admits a request as soon as another ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import random
import tempfile
import threading
import time
from collections.abc import Sequence
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


MID_MIXTRAL = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 1024,
    "initializer_range": 0.02,
}
MODELS = {"tiny": TINY_MIXTRAL, "mid": MID_MIXTRAL}


@dataclass(frozen=True)
class ServingOptions:
    worlds: tuple[int, ...] = (1, 4)
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 32
    """Requests per (system, concurrency); see `requests_per_client`."""
    prompt_tokens: tuple[int, int] = (8, 48)
    """Prompt lengths are drawn uniformly in this range (inclusive)."""
    max_tokens: int = 32
    seed: int = 0
    output_tokens: tuple[int, int] | None = None
    """Each request's max_tokens drawn uniformly in this range; None: all `max_tokens`."""
    model: str = "tiny"
    """`tiny` (2 layers, hidden 64) or `mid` (4 layers, hidden 512, vocabulary 8k)."""
    requests_per_client: int | None = None
    """Requests = this x the concurrency (instead of `requests`)."""
    runs: int = 1
    """Each (system, concurrency) measured this many times (the table shows each run)."""

    def requests_for(self, concurrency: int) -> int:
        if self.requests_per_client is None:
            return self.requests
        return self.requests_per_client * concurrency


REALISTIC = ServingOptions(
    worlds=(1,),
    concurrency=(16, 64),
    prompt_tokens=(16, 512),
    output_tokens=(8, 256),
    model="mid",
    requests_per_client=4,
    runs=3,
)


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


def make_prompts(o: ServingOptions, vocab: int, count: int | None = None) -> list[list[int]]:
    rng = random.Random(f"bench-serving/{o.seed}")
    low, high = o.prompt_tokens
    return [
        [rng.randrange(vocab) for _ in range(rng.randint(low, high))]
        for _ in range(o.requests if count is None else count)
    ]


def make_output_lengths(o: ServingOptions, count: int) -> list[int]:
    """Each request's max_tokens: `max_tokens`, or drawn from `output_tokens`."""
    if o.output_tokens is None:
        return [o.max_tokens] * count
    rng = random.Random(f"bench-serving/outputs/{o.seed}")
    return [rng.randint(*o.output_tokens) for _ in range(count)]


def _per_request(max_tokens: int | Sequence[int], count: int) -> list[int]:
    return [max_tokens] * count if isinstance(max_tokens, int) else list(max_tokens)


# ---------------------------------------------------------------- moe-ep


def run_clients(
    runtime: Runtime,
    prompts: list[list[int]],
    concurrency: int,
    max_tokens: int | Sequence[int],
) -> dict[str, float]:
    """`concurrency` closed-loop clients through the leader's Backend; `max_tokens` for all
    requests, or each its own."""
    outputs = _per_request(max_tokens, len(prompts))
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
            params = SamplingParams(temperature=0, max_tokens=outputs[index], ignore_eos=True)
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
) -> dict[int, list[dict[str, float]]]:
    """A group of `world` ranks (rank 0 here) serving `checkpoint`; each run's figures per
    concurrency."""
    longest = max(len(p) for p in prompts) + max(make_output_lengths(o, len(prompts)))
    settings = WorkerSettings(
        checkpoint=str(checkpoint),
        world_size=world,
        master_port=free_port(),
        device="cpu",
        backend="gloo",
        http_port=0,
        api_port=0,
        bind_address="127.0.0.1",
        kv_cache_tokens=max(4096, -(-max(o.concurrency) * longest // world)),
        max_batch_tokens=512 if o.model == "mid" else 256,
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
        figures: dict[int, list[dict[str, float]]] = {}
        for c in o.concurrency:
            asked, outputs = _workload(o, prompts, c)
            figures[c] = [run_clients(runtime, asked, c, outputs) for _ in range(o.runs)]
        return figures
    finally:
        runtime.stop()
        loop.join()
        for child in children:
            child.wait(60)


# ---------------------------------------------------------------- transformers


def _workload(
    o: ServingOptions, prompts: list[list[int]], concurrency: int
) -> tuple[list[list[int]], list[int]]:
    """The prompts and output lengths of a run at `concurrency`."""
    count = o.requests_for(concurrency)
    return prompts[:count], make_output_lengths(o, len(prompts))[:count]


def run_generate(
    model: Any,
    prompts: list[list[int]],
    concurrency: int,
    max_tokens: int | Sequence[int],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """`generate()` on batches of `concurrency` prompts, left-padded, greedy, on `device`; a
    batch runs to its longest output, each request counted up to its own."""
    outputs = _per_request(max_tokens, len(prompts))
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
        wanted = outputs[first : first + concurrency]
        longest = max(len(p) for p in wave)
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in wave], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in wave], device=device)
        clock, sent = Clock(), time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(wanted),
                min_new_tokens=max(wanted),
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        timings += [Timing(sent, clock.times[1], clock.times[n], n) for n in wanted]
    return summarize(timings, time.perf_counter() - start)


def tiny_mixtral(directory: Path, config: dict[str, Any] = TINY_MIXTRAL) -> Any | None:
    """A random Mixtral (the tiny one unless `config` says), saved to `directory`; None
    without transformers."""
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**config)).eval()
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
        checkpoint = Path(tmp) / f"{o.model}-mixtral"
        config = MODELS[o.model]
        hf = tiny_mixtral(checkpoint, config)
        if hf is None:
            if o.model != "tiny":
                raise SystemExit("bench-serving: the mid-size model needs transformers")
            seed_checkpoint(checkpoint)
        results["model"] = json.loads((checkpoint / "config.json").read_text())
        count = max(o.requests_for(c) for c in o.concurrency)
        prompts = make_prompts(o, config["vocab_size"], count)
        for world in o.worlds:
            figures = serve_moe_ep(checkpoint, world, o, prompts)
            results["systems"][f"moe-ep world {world}"] = figures
        if hf is not None:
            run_generate(hf, prompts[:2], 1, 4)  # warm-up
            baseline: dict[int, list[dict[str, float]]] = {}
            for c in o.concurrency:
                asked, outputs = _workload(o, prompts, c)
                baseline[c] = [run_generate(hf, asked, c, outputs) for _ in range(o.runs)]
            results["systems"]["transformers generate()"] = baseline
    print(format_table(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict[str, Any]) -> str:
    """One row per system, concurrency and run; the ratio is to transformers' run of the same
    index (its median over runs when moe-ep made more)."""
    o, systems = results["options"], results["systems"]
    hf = systems.get("transformers generate()")
    outputs = (
        f"{o['output_tokens'][0]}-{o['output_tokens'][1]}"
        if o.get("output_tokens")
        else str(o["max_tokens"])
    )
    lines = [
        f"prompts {o['prompt_tokens'][0]}-{o['prompt_tokens'][1]} tokens, {outputs} output "
        "tokens each, greedy; requests per run: "
        + ", ".join(
            f"{c} clients {ServingOptions(**_options(o)).requests_for(c)}" for c in o["concurrency"]
        ),
        f"{'system':<26}{'conc':>5}{'run':>4}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}"
        f"{'TPOT p50':>10}{'p99':>8}{'tok/s vs HF':>13}",
    ]
    for name, per_concurrency in systems.items():
        for c, runs in per_concurrency.items():
            for run, f in enumerate(_runs(runs)):
                ratio = ""
                if hf is not None:
                    base = _runs(hf[c])[min(run, len(_runs(hf[c])) - 1)]
                    ratio = f"{f['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x"
                lines.append(
                    f"{name:<26}{c:>5}{run + 1:>4}{f['requests_per_s']:>8.2f}"
                    f"{f['output_tokens_per_s']:>9.1f}"
                    f"{f['ttft_p50_s'] * 1e3:>8.1f}ms{f['ttft_p99_s'] * 1e3:>6.0f}ms"
                    f"{f['tpot_p50_s'] * 1e3:>8.1f}ms{f['tpot_p99_s'] * 1e3:>6.0f}ms{ratio:>13}"
                )
    return "\n".join(lines)


def _runs(figures: Any) -> list[dict[str, float]]:
    return figures if isinstance(figures, list) else [figures]


def _options(raw: dict[str, Any]) -> dict[str, Any]:
    known = {f for f in ServingOptions.__dataclass_fields__}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}


def add_parser(sub: Any) -> None:
    """`moe-worker bench-serving` and its flags."""
    p = sub.add_parser("bench-serving", help="serving throughput and latency vs transformers")
    p.add_argument("--json", dest="json_path", help="also write the figures to this file")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 4])
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=[8, 48])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workload",
        choices=["tiny", "realistic"],
        default="tiny",
        help="realistic: the mid-size Mixtral, prompts 16-512, outputs 8-256, 16 and 64 "
        "clients, 4 requests each, 3 runs (the other flags are ignored but --runs, "
        "--requests-per-client and --concurrency)",
    )
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--requests-per-client", type=int, default=None)
    p.set_defaults(run=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> int:
    args.concurrency_set = args.concurrency is not None
    args.concurrency = args.concurrency or [1, 4, 16]
    if args.workload == "realistic":
        options = dataclasses.replace(
            REALISTIC,
            runs=args.runs or REALISTIC.runs,
            requests_per_client=args.requests_per_client or REALISTIC.requests_per_client,
            concurrency=tuple(args.concurrency) if args.concurrency_set else REALISTIC.concurrency,
            seed=args.seed,
        )
    else:
        options = ServingOptions(
            worlds=tuple(args.worlds),
            concurrency=tuple(args.concurrency),
            requests=args.requests,
            prompt_tokens=(args.prompt_tokens[0], args.prompt_tokens[1]),
            max_tokens=args.max_tokens,
            seed=args.seed,
            runs=args.runs or 1,
            requests_per_client=args.requests_per_client,
        )
    run_serving_bench(options, args.json_path)
    return 0
