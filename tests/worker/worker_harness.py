"""Harness for worker tests: free ports, and running a function on N real gloo ranks.

Ranks are forked from the test process (torch is already imported there, and importing it again
costs seconds per process on small machines); each sets one intra-op thread, so forking after the
parent used OpenMP is safe. The parent's garbage is collected before forking: an object an earlier
test left in a reference cycle may own native threads (a rendezvous store's server), and a rank
that destroyed its copy in its own first full collection would join a thread that does not exist
in the child: the rank aborts (std::system_error) or hangs, and its peers time out.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
FIXTURES = HERE.parent / "fixtures" / "plans"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports (each socket held until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> set[str]:
    """The addresses sockets listen on at `port` in this network namespace ("::" is every IPv6
    and, dual-stack, every IPv4 address: where torch's own store listens)."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, words))
    return found


RankFn = Callable[[int, int], dict[str, Any]]


def _rank_main(fn: RankFn, rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        result = fn(rank, world)
        dist.destroy_process_group()
        Path(out).write_text(json.dumps(result))
    except BaseException:
        Path(out).write_text(json.dumps({"error": traceback.format_exc()}))
        sys.exit(1)


def run_world(
    fn: RankFn, world: int, tmp: Path, timeout: float = 240, check: bool = True
) -> list[dict[str, Any]]:
    """Run `fn(rank, world)` on `world` gloo ranks; returns each rank's JSON result (with
    `check=False`, a rank that failed or died gives `{"error": ...}` instead of failing)."""
    gc.collect()  # here, where the threads of whatever it frees still run (see above)
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    outs = [tmp / f"rank{r}.json" for r in range(world)]
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world, port, str(outs[r])))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    results = [json.loads(o.read_text()) if o.exists() else {"error": "no result"} for o in outs]
    errors = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if "error" in res]
    assert not (check and errors), "\n".join(errors)
    return results


class Cluster:
    """`world` real `moe-worker serve` processes on 127.0.0.1, gloo, traffic off by default; rank
    0 serves the OpenAI-compatible API on `api_port`."""

    def __init__(
        self,
        tmp: Path,
        world: int,
        env: dict[str, str],
        token: str = "s3cret-token",
        rank_env: Callable[[int], dict[str, str]] = lambda rank: {},
    ) -> None:
        import os

        self.world, self.token, self.tmp = world, token, tmp
        token_file = tmp / "token"
        token_file.write_text(token + "\n")
        # Held open together: ports taken one by one may come back twice (the kernel reuses a
        # closed ephemeral port), and two servers of one group must not share one.
        master_port, self.api_port, *self.http_ports = free_ports(world + 2)
        self.envs = [
            {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "MOE_POD_NAME": f"demo-worker-{rank}",
                "MOE_WORLD_SIZE": str(world),
                "MOE_MASTER_ADDR": "127.0.0.1",
                "MOE_MASTER_PORT": str(master_port),
                "MOE_BACKEND": "gloo",
                "MOE_DEVICE": "cpu",
                "MOE_TOKEN_PATH": str(token_file),
                "MOE_HTTP_PORT": str(self.http_ports[rank]),
                "MOE_BIND_ADDRESS": "127.0.0.1",
                "MOE_PLAN_PATH": str(tmp / "no-plan-mounted"),
                "MOE_API_PORT": str(self.api_port if rank == 0 else 0),
                **env,
                **rank_env(rank),
            }
            for rank in range(world)
        ]
        self.procs: list[subprocess.Popen[bytes]] = [self._spawn(r) for r in range(world)]

    def _spawn(self, rank: int) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"rank{rank}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "moe_worker.main", "serve"],
            env=self.envs[rank],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def restart(self, rank: int) -> None:
        """A new process of `rank` (its old one gone): it joins the running group."""
        assert self.procs[rank].poll() is not None, f"rank {rank} still runs"
        self.procs[rank] = self._spawn(rank)

    def url(self, rank: int, path: str) -> str:
        return f"http://127.0.0.1:{self.http_ports[rank]}{path}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/v1"

    def request(
        self,
        rank: int,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        """(status, parsed JSON or text) of a GET (no body) or POST."""
        import urllib.error
        import urllib.request

        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url(rank, path), data=data)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        text = payload.decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def wait_ready(self, timeout: float = 180) -> None:
        import time

        deadline = time.monotonic() + timeout
        for rank in range(self.world):
            while True:
                assert self.procs[rank].poll() is None, self.logs(rank)
                try:
                    if self.request(rank, "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"rank {rank} not ready:\n{self.logs(rank)}"
                time.sleep(0.3)

    def logs(self, rank: int) -> str:
        return (self.tmp / f"rank{rank}.log").read_text()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except Exception:
                proc.kill()


def parse_metric(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of metric `name` in Prometheus text: labels tuple -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                samples[tuple(sorted(sample.labels.items()))] = sample.value
    return samples
