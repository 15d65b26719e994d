#!/usr/bin/env python3
"""Measure issue 19's API numbers (items 1 and 2) on a real two-rank `moe-worker serve`.

    python hack/measure_hostile_api.py [--json out.json]

Writes a tiny Mixtral with a tokenizer (transformers' save_pretrained, tests/e2e/models.py),
starts `moe-worker serve --world 2` with the Python running this script (so an old checkout is
measured with `PYTHONPATH=<old>/worker:<old>/contract`), and measures, each case after the
group is idle again:

- alone: a small request (3 token ids, 8 new tokens), the median of 10;
- stop ids: one request of 64 prompts x 400k stop_token_ids while small requests run back to back
  (their worst and median latency) and how long the big one took to be answered, and its status;
- big text: one 7.9 MB text prompt, the same; four of them at once, the same.

Nothing but the OpenAI port is used. Spawns processes: run it under /tmp/moe-heavy.lock.
"""

from __future__ import annotations

import argparse
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
    proc = subprocess.Popen(command, env={**env, "OMP_NUM_THREADS": "1"}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
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
    threads = [
        threading.Thread(target=lambda b=big: answers.append(post(url, b))) for big in bigs
    ]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    from models import write_mixtral  # the e2e suite's tiny Mixtral with a tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_mixtral(Path(tmp) / "tiny-mixtral", layers=2, vocab_size=VOCAB)
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
        finally:
            proc.terminate()
            proc.wait(60)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
