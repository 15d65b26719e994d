#!/usr/bin/env python3
"""Measure issue 19's API numbers (items 1, 2 and 7), for whatever checkout is imported.

    python hack/measure_hostile_api.py group [--json out.json]
    python hack/measure_hostile_api.py tokenizer
    python hack/measure_hostile_api.py slowloris [--connections 350 --every 10 --seconds 35]

`group` writes a tiny Mixtral with a tokenizer (transformers' save_pretrained, tests/e2e/models.py),
starts `moe-worker serve --world 2` with the Python running this script (so an old checkout is
measured with `PYTHONPATH=<old>/worker:<old>/contract`), and measures, each case after the
group is idle again:

- alone: a small request (3 token ids, 8 new tokens), the median of 10;
- stop ids: one request of 64 prompts x 400k stop_token_ids while small requests run back to back
  (their worst and median latency) and how long the big one took to be answered, and its status;
- big text: one 8.3 MB text prompt, the same; four of them at once, the same;
- tokenized: four 2.1 MB text prompts at once, short enough to be tokenized (540k tokens each,
  then refused: the context is 64k tokens), the same.

Nothing but the OpenAI port is used. Spawns processes: run it under /tmp/moe-heavy.lock.

`tokenizer` compares ways to encode text beside a serving loop (a Python thread doing steps of
pure Python, as the leader's loop does between its collectives): four 1 MB texts encoded with
`encode` (holds the GIL), `encode_batch` (releases it) on four threads and on one, and a process
pool; each 5 times, medians: how long the four took, the loop's longest pause, and its steps per
second against idle.

`slowloris` serves the OpenAI app (over the tests' scripted backend) in this process, opens
`--connections` connections that send one byte of a request head every `--every` seconds, and
counts how many are still open as time goes on, and how long /health takes meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
VOCAB = 64
CONTEXT = 65536


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(url: str, body: bytes, timeout: float = 300.0) -> tuple[int, float, str]:
    """(status, seconds, the error message or "") of one POST /v1/completions."""
    request = urllib.request.Request(
        f"{url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            response.read()
            return response.status, time.perf_counter() - start, ""
    except urllib.error.HTTPError as error:
        answer = error.read()
        try:
            message = json.loads(answer)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = answer[:200].decode("utf-8", "replace")
        return error.code, time.perf_counter() - start, message
    except OSError as error:
        return 0, time.perf_counter() - start, str(error)


def start_group(checkpoint: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    api, http = free_port(), free_port()
    command = [
        *(sys.executable, "-m", "moe_worker.main", "serve", "--checkpoint", str(checkpoint)),
        *("--world", "2", "--bind", "127.0.0.1", "--api-port", str(api)),
        *("--http-port", str(http), "--kv-cache-tokens", "4096"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    proc = subprocess.Popen(
        command,
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{api}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the group exited: {log.read_text()[-2000:]}")
        try:
            with NO_PROXY.open(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the group did not become ready")


def small(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": [2, 3, 4], "max_tokens": 8}).encode()


def during(url: str, model: str, bigs: list[bytes]) -> dict[str, Any]:
    """Small requests back to back while `bigs` are in flight (each on its own thread)."""
    answers: list[tuple[int, float, str]] = []
    threads = [threading.Thread(target=lambda b=big: answers.append(post(url, b))) for big in bigs]
    for thread in threads:
        thread.start()
    latencies, statuses = [], []
    while any(t.is_alive() for t in threads) or not latencies:
        status, seconds, _ = post(url, small(model))
        latencies.append(seconds)
        statuses.append(status)
    for thread in threads:
        thread.join()
    return {
        "big": [{"status": s, "seconds": round(t, 3), "message": m[:160]} for s, t, m in answers],
        "small_max_s": round(max(latencies), 3),
        "small_median_s": round(statistics.median(latencies), 3),
        "small_count": len(latencies),
        "small_statuses": sorted(set(statuses)),
    }


def measure_group() -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    from models import write_mixtral  # the e2e suite's tiny Mixtral with a tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_mixtral(Path(tmp) / "tiny-mixtral", layers=2, vocab_size=VOCAB)
        # A real model's context (64k tokens), so that long texts are tokenized, not refused
        # by their length alone.
        config = json.loads((checkpoint / "config.json").read_text())
        config["max_position_embeddings"] = CONTEXT
        (checkpoint / "config.json").write_text(json.dumps(config))
        proc, url = start_group(checkpoint, Path(tmp) / "group.log")
        try:
            model = "tiny-mixtral"
            alone = [post(url, small(model))[1] for _ in range(10)]
            stop_ids = json.dumps(
                {
                    "model": model,
                    "prompt": [[2, 3, 4]] * 64,
                    "max_tokens": 4,
                    "stop_token_ids": [2 + i % (VOCAB - 2) for i in range(400_000)],
                }
            ).encode()
            text = json.dumps(
                {"model": model, "prompt": "the cat sat on the mat " * 360_000, "max_tokens": 4}
            ).encode()
            results: dict[str, Any] = {"alone_median_s": round(statistics.median(alone), 3)}
            results["stop_ids"] = {"body_mb": round(len(stop_ids) / 1e6, 1)}
            results["stop_ids"].update(during(url, model, [stop_ids]))
            results["big_text"] = {"body_mb": round(len(text) / 1e6, 1)}
            results["big_text"].update(during(url, model, [text]))
            results["big_text_x4"] = during(url, model, [text] * 4)
            # Texts under 32 characters a token of the context: tokenized, then refused (540k
            # tokens each).
            tokenized = json.dumps(
                {"model": model, "prompt": "the cat sat on the mat " * 90_000, "max_tokens": 4}
            ).encode()
            results["tokenized_x4"] = {"body_mb": round(len(tokenized) / 1e6, 1)}
            results["tokenized_x4"].update(during(url, model, [tokenized] * 4))
        finally:
            proc.terminate()
            proc.wait(60)
    return results


_TOKENIZER: Any = None


def _load_tokenizer(path: str) -> None:
    global _TOKENIZER
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_file(path)


def _encode_in_process(text: str) -> list[int]:
    return _TOKENIZER.encode_batch([text])[0].ids  # type: ignore[no-any-return]


def _loop_beside(submit: Any, texts: list[str]) -> tuple[float, float, float]:
    """(seconds to encode `texts`, the loop's longest pause in ms, its steps/s vs idle)."""
    stop, gaps = threading.Event(), []

    def loop() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            sum(range(5000))  # a step's Python work
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.3)
    idle_rate = len(gaps) / 0.3
    start, first = time.perf_counter(), len(gaps)
    for future in [submit(text) for text in texts]:
        future.result()
    seconds = time.perf_counter() - start
    busy = gaps[first:]
    stop.set()
    thread.join()
    return seconds, max(busy) * 1000, len(busy) / seconds / idle_rate


def measure_tokenizer() -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    from models import write_tokenizer
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_tokenizer(Path(tmp), 1000))
        tokenizer = Tokenizer.from_file(path)
        texts = ["the cat sat on the mat " * 45_000] * 4  # 4 x 1 MB
        four, one = ThreadPoolExecutor(4), ThreadPoolExecutor(1)
        spawn = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            1, mp_context=spawn, initializer=_load_tokenizer, initargs=(path,)
        )
        pool.submit(_encode_in_process, "warm").result()
        ways = {
            "encode, 4 threads (GIL held)": lambda t: four.submit(lambda: tokenizer.encode(t).ids),
            "encode_batch, 4 threads": lambda t: four.submit(
                lambda: tokenizer.encode_batch([t])[0].ids
            ),
            "encode_batch, 1 thread": lambda t: one.submit(
                lambda: tokenizer.encode_batch([t])[0].ids
            ),
            "process pool of 1 (spawn)": lambda t: pool.submit(_encode_in_process, t),
        }
        runs: dict[str, list[tuple[float, float, float]]] = {way: [] for way in ways}
        for _ in range(5):
            for way, submit in ways.items():
                runs[way].append(_loop_beside(submit, texts))
        pool.shutdown()
    print("| how | 4 x 1 MB encoded (s) | loop's longest pause (ms) | loop steps/s vs idle |")
    print("|---|---|---|---|")
    results = {}
    for way, samples in runs.items():
        medians = [statistics.median(sample[i] for sample in samples) for i in range(3)]
        results[way] = [round(m, 2) for m in medians]
        print(f"| {way} | {medians[0]:.2f} | {medians[1]:.0f} | {medians[2]:.2f} |")
    return results


def measure_slowloris(connections: int, every: float, seconds: float) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests" / "worker"))
    from api_double import ScriptedBackend, make_card

    from moe_worker.api import create_openai_app, start

    handle = start(create_openai_app(ScriptedBackend(make_card())), "127.0.0.1", 0)
    socks = [socket.create_connection(("127.0.0.1", handle.port)) for _ in range(connections)]
    head = b"POST /v1/completions HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    open_counts, health = [], []
    start_time = time.monotonic()
    sent = 0
    try:
        while (elapsed := time.monotonic() - start_time) < seconds:
            if elapsed >= sent * every:
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.send(head[sent : sent + 1])
                sent += 1
            alive = 0
            for sock in socks:
                sock.setblocking(False)
                try:  # an answer (a 408) or the end of the stream: the server cut it
                    sock.recv(4096, socket.MSG_PEEK)
                except BlockingIOError:
                    alive += 1
                except OSError:
                    pass
            started = time.perf_counter()
            with NO_PROXY.open(f"{handle.url}/health", timeout=30) as response:
                response.read()
            health.append(time.perf_counter() - started)
            open_counts.append((round(elapsed, 1), alive))
            time.sleep(1.0)
    finally:
        for sock in socks:
            sock.close()
        handle.stop()
    marks = {f"open_after_{int(t)}s": n for t, n in open_counts if int(t) % 5 == 0}
    return {**marks, "health_max_s": round(max(health), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=["group", "tokenizer", "slowloris"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--connections", type=int, default=350)
    parser.add_argument("--every", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=35.0)
    args = parser.parse_args()
    if args.case == "group":
        results = measure_group()
    elif args.case == "tokenizer":
        results = measure_tokenizer()
    else:
        results = measure_slowloris(args.connections, args.every, args.seconds)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
