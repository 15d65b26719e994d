"""Drain before/after (issue 19, item 4), printed as docs/worker.md's table: 4 streams of 200
tokens on `moe-worker serve --world 2` (a tiny checkpoint), a signal after their first token:
SIGINT (stops at once: what SIGTERM did before) vs SIGTERM (drains). Spawns processes: run it
under the shared lock, `flock /tmp/moe-heavy.lock .venv/bin/python -m tests.perf.drain_stop`.
A measurement script, not a test (pytest does not collect it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

from moe_contract.shape import ModelShape
from moe_worker.models.checkpoint import write_checkpoint
from moe_worker.models.weights import SyntheticWeights
from tests.worker.worker_harness import free_port

SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, vocab_size=80
)
STREAMS, MAX_TOKENS = 4, 200


def start_group(tmp: Path) -> tuple[subprocess.Popen[bytes], openai.OpenAI]:
    checkpoint = write_checkpoint(tmp / "ckpt", SyntheticWeights.for_shape(SHAPE, seed=1))
    api = free_port("127.0.0.1")
    control = free_port("127.0.0.1")
    while api in (control, control + 1):
        control = free_port("127.0.0.1")
    command = [
        *(sys.executable, "-m", "moe_worker.main", "serve", "--checkpoint", str(checkpoint)),
        *("--world", "2", "--http-port", str(control), "--api-port", str(api)),
        *("--master-port", str(free_port("127.0.0.1")), "--kv-cache-tokens", "1024"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    launcher = subprocess.Popen(
        command, env={**env, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{api}/v1", api_key="-", max_retries=0)
    deadline = time.monotonic() + 180
    while True:
        try:
            client.completions.create(model=model_of(client), prompt=[2], max_tokens=1)
            return launcher, client
        except (openai.APIError, IndexError):
            assert time.monotonic() < deadline, "the group did not become ready"
            time.sleep(0.3)


def model_of(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def stream(client: openai.OpenAI, started: threading.Barrier, results: list) -> None:
    try:
        events = client.completions.create(
            model=model_of(client), prompt=[2], max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        tokens, reason = 0, None
        for index, event in enumerate(events):
            if index == 0:
                started.wait()
            if event.choices:
                reason = event.choices[0].finish_reason or reason
            if event.usage is not None:
                tokens = event.usage.completion_tokens
        results.append((tokens, reason))
    except openai.APIError as error:
        results.append(("error", str(error)[:60]))


def measure(signum: signal.Signals) -> str:
    launcher, client = start_group(Path(tempfile.mkdtemp()))
    started, results = threading.Barrier(STREAMS + 1, timeout=60), []
    threads = [
        threading.Thread(target=stream, args=(client, started, results)) for _ in range(STREAMS)
    ]
    for thread in threads:
        thread.start()
    started.wait()
    signalled = time.monotonic()
    launcher.send_signal(signum)
    time.sleep(0.2)
    try:
        client.completions.create(model=model_of(client), prompt=[2], max_tokens=2)
        new = "200"
    except openai.APIStatusError as error:
        new = str(error.status_code)
    except openai.APIConnectionError:
        new = "connection refused"
    for thread in threads:
        thread.join(120)
    code = launcher.wait(120)
    took = time.monotonic() - signalled
    whole = results.count((MAX_TOKENS, "length"))
    ended = sorted({str(r[1]) for r in results if r != (MAX_TOKENS, "length")})
    return (
        f"| {signum.name} | {whole} of {STREAMS} | {STREAMS - whole} {ended or ''} | {new} | "
        f"{took:.2f} s, exit {code} |"
    )


def main() -> None:
    print("| signal | streams finished whole | ended early | a new request | signal to exit |")
    print("|---|---|---|---|---|")
    for signum in (signal.SIGINT, signal.SIGTERM):
        print(measure(signum), flush=True)


if __name__ == "__main__":
    main()
