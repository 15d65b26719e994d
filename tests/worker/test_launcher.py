"""`moe-worker serve --checkpoint DIR --world 2` with no rank in the environment starts both ranks
here (torchrun-like); a rank that dies stops the group with a non-zero exit, a signal stops it
cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from moe_contract.shape import ModelShape
from moe_worker import launcher as pod_launcher
from moe_worker.launcher import LocalRanks, rank_settings
from moe_worker.models.checkpoint import write_checkpoint
from moe_worker.models.weights import SyntheticWeights
from moe_worker.settings import WorkerSettings
from tests.perf import drain_stop
from tests.worker.worker_harness import free_port, listening

pytestmark = pytest.mark.distributed

SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, vocab_size=80
)


def two_free_ports() -> int:
    """A port p with p and p + 1 free (the ranks' control ports)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            base = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
                return base
    raise RuntimeError("no two consecutive free ports")


PORT_FLAGS = ("--http-port", "--api-port", "--master-port")
STREAMS = 2  # streams running when the SIGTERM comes (drain_stop.stream: MAX_TOKENS each)


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet, an orphan's fate in a container, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def launcher_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def group(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    checkpoint = write_checkpoint(tmp_path / "ckpt", SyntheticWeights.for_shape(SHAPE, seed=1))
    base = two_free_ports()
    command = [  # no --bind: the local default
        *(sys.executable, "-m", "moe_worker.main", "serve"),
        *("--checkpoint", str(checkpoint), "--world", "2"),
        *("--http-port", str(base), "--api-port", str(free_port("127.0.0.1"))),
        *("--master-port", str(free_port("127.0.0.1")), "--kv-cache-tokens", "256"),
    ]
    log = (tmp_path / "launcher.log").open("wb")
    launcher = subprocess.Popen(command, env=launcher_env(), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180
        for port in (base, base + 1):
            while True:
                assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()
                try:
                    if get(port, "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()
                time.sleep(0.3)
        pids = [get(port, "/healthz")[1]["pid"] for port in (base, base + 1)]
        assert [get(port, "/healthz")[1]["rank"] for port in (base, base + 1)] == [0, 1]
        yield launcher, pids
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait(30)


def test_a_rank_that_dies_stops_the_group_with_a_failure(
    group: tuple[subprocess.Popen[bytes], list[int]],
) -> None:
    launcher, pids = group
    os.kill(pids[1], signal.SIGKILL)
    assert launcher.wait(90) != 0
    deadline = time.monotonic() + 30
    while alive(pids[0]):
        assert time.monotonic() < deadline, "rank 0 outlived the group"
        time.sleep(0.2)


def test_a_sigterm_drains_running_requests_then_stops_every_rank_cleanly(
    group: tuple[subprocess.Popen[bytes], list[int]],
) -> None:
    """Issue 19, item 4: a SIGTERM (the kubelet's, forwarded by the launcher) used to abort every
    running request ("the server is stopping"). Now the leader drains: /readyz 503, a new
    request 503 before its first byte, the running streams finish whole; then every rank exits
    0 (the local default drain, 20 s, is far more than they need)."""
    launcher, pids = group
    api = int(launcher.args[launcher.args.index("--api-port") + 1])
    control = int(launcher.args[launcher.args.index("--http-port") + 1])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{api}/v1", api_key="-", max_retries=0)
    model = client.models.list().data[0].id
    started, results = threading.Barrier(STREAMS + 1, timeout=60), []
    threads = [
        threading.Thread(target=drain_stop.stream, args=(client, started, results))
        for _ in range(STREAMS)
    ]
    for thread in threads:
        thread.start()
    started.wait()  # every stream has its first token
    launcher.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the launcher passes it on
    assert get(control, "/readyz")[0] == 503
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=model, prompt=[2], max_tokens=2)
    assert refused.value.status_code == 503 and "draining" in str(refused.value)
    for thread in threads:
        thread.join(120)
    # every running stream finished whole
    assert results == [(drain_stop.MAX_TOKENS, "length")] * STREAMS
    assert launcher.wait(60) == 0
    assert not any(alive(pid) for pid in pids)


def test_a_second_serve_on_its_ports_says_so_and_ranks_die_with_their_launcher(
    group: tuple[subprocess.Popen[bytes], list[int]],
) -> None:
    launcher, pids = group
    second = subprocess.run(
        launcher.args, env=launcher_env(), capture_output=True, timeout=120, check=False
    )
    assert second.returncode == 2
    lines = second.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "is in use" in lines[0] and "another moe-worker serve" in lines[0]
    assert all(alive(pid) for pid in pids)  # the first group serves on
    # Issue 19, item 6: the control ports, the API and the store on this machine only (they
    # were on 0.0.0.0, every address).
    ports = [int(launcher.args[launcher.args.index(flag) + 1]) for flag in PORT_FLAGS]
    ports.append(ports[0] + 1)  # rank 1's control port
    assert {port: listening(port) for port in ports} == {port: {"127.0.0.1"} for port in ports}
    launcher.kill()  # kill -9: no handler runs, nothing is forwarded
    launcher.wait(30)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "a rank outlived its launcher"
        time.sleep(0.2)


def test_local_ranks_of_a_pod_take_global_ranks_ports_and_gpus() -> None:
    settings = WorkerSettings(http_port=8080, api_port=8000)
    ranks = LocalRanks(local_world=4, rank_offset=8, world_size=16)
    children = [rank_settings(settings, ranks, local) for local in range(4)]
    assert [(c.rank, c.local_rank, c.world_size) for c in children] == [
        (8 + i, i, 16) for i in range(4)
    ]
    assert [c.http_port for c in children] == [8080, 8081, 8082, 8083]
    assert all(c.api_port == 0 for c in children)  # only global rank 0 serves the API
    first = rank_settings(settings, LocalRanks(2), 0)
    assert (first.rank, first.api_port, first.world_size) == (0, 8000, 2)


def test_the_pods_message_is_the_first_failed_ranks_own(tmp_path: Path) -> None:
    """Ranks of a pod write their fatal messages to files of their own: the pod reports the first
    failed rank's (rank 0's reason, not rank 1's later broken collective nor `exited with code
    1`), and the exit's description when a rank said nothing (killed)."""
    messages = [tmp_path / "rank-0", tmp_path / "rank-1"]
    for message in messages:
        message.touch()
    script = (
        "import pathlib, sys, time; time.sleep(float(sys.argv[2])); "
        "pathlib.Path(sys.argv[1]).write_text(sys.argv[3]); sys.exit(1)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(messages[0]), "0", "rank 4: no room"]),
        subprocess.Popen([sys.executable, "-c", script, str(messages[1]), "30", "rank 5: late"]),
    ]
    why: list[str] = []
    assert pod_launcher._watch(procs, 4, why, messages) == 1
    assert why == ["rank 4: no room"]
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    killed.kill()
    why = []
    assert pod_launcher._watch([killed], 6, why, [tmp_path / "silent"]) == 1
    assert why == ["rank 6 was killed by SIGKILL"]
