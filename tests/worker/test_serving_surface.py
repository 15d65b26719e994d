"""The serving surface against a REAL group: two `moe-worker serve` processes (gloo) serving a tiny
random Mixtral that ships a tokenizer and a chat template (`chat_fixtures`), driven by the
official `openai` client and by the ecosystem's own clients run as commands (lm-eval's
`local-completions`, guidellm). Log-probabilities equal transformers' log_softmax on the same
checkpoint; `n` choices that share a prefill equal each choice asked alone; the serving metrics
add up after known traffic; a client that goes away gives its KV blocks back."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from chat_fixtures import save_chat_mixtral
from openai_checks import client, token_ids
from worker_harness import Cluster

from tests.requirements import missing

pytestmark = pytest.mark.distributed

KV_TOKENS = 512
TOLERANCE = 1e-4
"""fp32 log-probabilities: moe-ep's against transformers' (max abs difference)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_mixtral(tmp_path_factory.mktemp("chat-mixtral"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[Cluster]:
    env = {
        "MOE_CHECKPOINT": str(checkpoint),
        "MOE_KV_CACHE_TOKENS": str(KV_TOKENS),
        "MOE_MAX_BATCH_TOKENS": "16",  # prompts longer than 16 tokens prefill in chunks
    }
    c = Cluster(Path(tmp_path_factory.mktemp("cluster")), 2, env)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def url(cluster: Cluster) -> str:
    return cluster.api_url.removesuffix("/v1")


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def log_softmax(model: Any, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities [len(ids), V]: row i predicts token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{error.code}: {error.read().decode()}") from None


def test_logprobs_and_echo_equal_transformers_log_softmax(
    url: str, checkpoint: Path, reference: Any
) -> None:
    prompts = [[3, 4, 5], [7], [3 + i % 17 for i in range(40)]]  # 40 tokens: three chunks
    answer = post(
        url,
        "/v1/completions",
        {
            "model": checkpoint.name,
            "prompt": prompts,
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
            "echo": True,
            "logprobs": 5,
        },
    )
    worst = 0.0
    for choice, prompt in zip(answer["choices"], prompts, strict=True):
        generated = choice["token_ids"]
        ids = prompt + generated
        expected = log_softmax(reference, ids)
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(ids)
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        for i in range(1, len(ids)):
            row = expected[i - 1]
            worst = max(worst, abs(logprobs["token_logprobs"][i] - row[ids[i]].item()))
            top = sorted(logprobs["top_logprobs"][i].values(), reverse=True)
            want = row.topk(5).values.tolist()
            worst = max(worst, abs(top[0] - want[0]))  # the most likely, whatever its text
            if i >= len(prompt):  # greedy: a generated token is the most likely one
                assert generated[i - len(prompt)] == int(row.argmax())
    assert worst <= TOLERANCE, worst
    scored = post(
        url,
        "/v1/completions",
        {
            "model": checkpoint.name,
            "prompt": prompts[2],
            "max_tokens": 0,
            "echo": True,
            "logprobs": 0,
        },
    )["choices"][0]
    expected = log_softmax(reference, prompts[2])
    got = scored["logprobs"]["token_logprobs"][1:]
    want = [expected[i - 1, prompts[2][i]].item() for i in range(1, len(prompts[2]))]
    assert (
        scored["token_ids"] == []
        and max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOLERANCE
    )


def test_chat_logprobs_equal_transformers(url: str, checkpoint: Path, reference: Any) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "hello the cat"}]
    prompt = list(
        AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    result = client(url).chat.completions.create(
        model=checkpoint.name,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert result.usage is not None and result.usage.prompt_tokens == len(prompt)
    choice = result.choices[0]
    generated = token_ids(choice)
    expected = log_softmax(reference, prompt + generated)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    for k, entry in enumerate(choice.logprobs.content):
        row = expected[len(prompt) + k - 1]
        assert abs(entry.logprob - row[generated[k]].item()) <= TOLERANCE
        tops = [t.logprob for t in entry.top_logprobs]
        assert (
            max(abs(a - b) for a, b in zip(tops, row.topk(3).values.tolist(), strict=True))
            <= TOLERANCE
        )


def test_chat_streamed_and_not_on_the_real_model(url: str, checkpoint: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    sdk = client(url)
    messages = [{"role": "system", "content": "you are kind"}, {"role": "user", "content": "a cat"}]
    whole = sdk.chat.completions.create(
        model=checkpoint.name,
        messages=messages,
        max_completion_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    text = whole.choices[0].message.content
    ids = token_ids(whole.choices[0])
    assert text == tokenizer.decode(ids, skip_special_tokens=True)[: len(text or "")]
    chunks = list(
        sdk.chat.completions.create(
            model=checkpoint.name,
            messages=messages,  # type: ignore[arg-type]
            max_completion_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def tokens_run(cluster: Cluster) -> float:
    """Tokens every rank ran through the model so far (control ports)."""
    return sum(rank_metric(cluster, rank, "moe_tokens_processed_total") for rank in range(2))


def test_n_choices_share_a_prefill_and_equal_each_alone(
    url: str, checkpoint: Path, cluster: Cluster
) -> None:
    sdk = client(url)
    prompt = [3 + i % 17 for i in range(23)]  # 23 tokens: the shared prefill is chunked
    sampled = {"temperature": 0.9, "top_p": 0.95, "max_tokens": 6}
    before = tokens_run(cluster)
    together = sdk.completions.create(
        model=checkpoint.name,
        prompt=prompt,
        n=3,
        seed=11,
        extra_body={"ignore_eos": True},
        **sampled,
    )
    # One prefill of 23 tokens, the 2 siblings' last prompt token each, 5 decode feeds each.
    assert tokens_run(cluster) - before == 23 + 2 + 3 * 5
    assert [c.index for c in together.choices] == [0, 1, 2]
    for j, choice in enumerate(together.choices):
        alone = sdk.completions.create(
            model=checkpoint.name,
            prompt=prompt,
            seed=11 + j,
            extra_body={"ignore_eos": True},
            **sampled,
        )
        assert token_ids(choice) == token_ids(alone.choices[0])
    assert together.usage is not None and together.usage.prompt_tokens == len(prompt)


def metrics(url: str) -> dict[str, float]:
    """The API port's samples, by name with labels."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def rank_metric(cluster: Cluster, rank: int, name: str) -> float:
    status, text = cluster.request(rank, "/metrics")
    assert status == 200
    return next(
        float(line.rsplit(" ", 1)[1])
        for line in str(text).splitlines()
        if line.startswith(f"{name}{{")
    )


def kv_free(cluster: Cluster) -> float:
    """Free KV tokens over both ranks, as each rank's own cache says (control port)."""
    return sum(rank_metric(cluster, r, "moe_kv_cache_free_tokens") for r in range(cluster.world))


def wait_for(condition: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_serving_metrics_after_known_traffic(url: str, checkpoint: Path) -> None:
    model = f'{{model_name="{checkpoint.name}"}}'
    before = metrics(url)
    post(
        url,
        "/v1/completions",
        {
            "model": checkpoint.name,
            "prompt": [[3, 4, 5], [6, 7]],
            "max_tokens": 5,
            "ignore_eos": True,
        },
    )
    after = metrics(url)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew(f"vllm:prompt_tokens_total{model}") == 5
    assert grew(f"vllm:generation_tokens_total{model}") == 10
    success = (
        f'vllm:request_success_total{{finished_reason="length",model_name="{checkpoint.name}"}}'
    )
    assert grew(success) == 2
    assert grew(f"vllm:time_to_first_token_seconds_count{model}") == 2
    assert grew(f"vllm:inter_token_latency_seconds_count{model}") == 8
    assert grew(f"vllm:request_queue_time_seconds_count{model}") == 2
    assert grew(f"vllm:e2e_request_latency_seconds_count{model}") == 2
    assert after[f"vllm:num_requests_running{model}"] == 0
    assert after[f"vllm:num_requests_waiting{model}"] == 0
    assert after[f"vllm:kv_cache_usage_perc{model}"] == 0


def test_a_client_gone_mid_stream_gives_its_kv_blocks_back(
    url: str, checkpoint: Path, cluster: Cluster
) -> None:
    model = f'{{model_name="{checkpoint.name}"}}'
    wait_for(lambda: kv_free(cluster) == cluster.world * KV_TOKENS)
    body = json.dumps(
        {
            "model": checkpoint.name,
            "prompt": [3, 4, 5, 6],
            "max_tokens": 100,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = b""
    while b"data: {" not in received:  # the first token is out: the sequence is running
        received += sock.recv(4096)
    assert metrics(url)[f"vllm:num_requests_running{model}"] == 1
    assert metrics(url)[f"vllm:kv_cache_usage_perc{model}"] > 0
    assert kv_free(cluster) < cluster.world * KV_TOKENS
    sock.close()
    wait_for(lambda: metrics(url)[f"vllm:num_requests_running{model}"] == 0)
    assert metrics(url)[f"vllm:kv_cache_usage_perc{model}"] == 0  # the leader's mirror
    wait_for(lambda: kv_free(cluster) == cluster.world * KV_TOKENS)  # the ranks' own caches
    abort = f'vllm:request_success_total{{finished_reason="abort",model_name="{checkpoint.name}"}}'
    assert metrics(url)[abort] >= 1


def client_command(name: str) -> str:
    """A client installed apart by `make setup` (`.venv/clients`: its own dependencies)."""
    path = Path(sys.prefix) / "clients" / "bin" / name
    if not path.exists():
        missing(f"{path} is not installed (make setup installs it)")
    return str(path)


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TASK = """task: tiny_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""
DOCS = [
    ("the cat sat on the", " mat"),
    ("the dog sat on the", " log"),
    ("a cat and a dog", " met on a mat"),
    ("hello", " you are kind"),
]


def run_lm_eval(model: str, model_args: str, tasks: Path, out: Path) -> dict[int, list[Any]]:
    """lm-eval on the tiny task; each document's (loglikelihood, is_greedy)."""
    import os

    command = [
        client_command("lm_eval"),
        *("--model", model, "--model_args", model_args, "--device", "cpu"),
        *("--tasks", "tiny_loglikelihood", "--include_path", str(tasks)),
        *("--log_samples", "--output_path", str(out)),
    ]
    done = subprocess.run(
        command, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = out.rglob("samples_tiny_loglikelihood_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {row["doc_id"]: row["resps"][0][0] for row in rows}


def test_lm_eval_local_completions_equals_its_own_hf_model(
    url: str, checkpoint: Path, tmp_path: Path
) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in DOCS))
    (tmp_path / "tiny_loglikelihood.yaml").write_text(TASK.format(data=data))
    served = run_lm_eval(
        "local-completions",
        f"model={checkpoint.name},base_url={url}/v1/completions,tokenizer_backend=remote,"
        "num_concurrent=1,max_retries=1",
        tmp_path,
        tmp_path / "served",
    )
    local = run_lm_eval(
        "hf",
        f"pretrained={checkpoint},dtype=float32,add_bos_token=False",  # the API's: no BOS added
        tmp_path,
        tmp_path / "hf",
    )
    assert sorted(served) == sorted(local) == list(range(len(DOCS)))
    for doc, (loglikelihood, greedy) in served.items():
        assert abs(float(loglikelihood) - float(local[doc][0])) <= TOLERANCE, (doc, served, local)
        assert greedy == local[doc][1]


def test_guidellm_drives_the_server_and_reports_ttft_and_itl(
    url: str, checkpoint: Path, tmp_path: Path
) -> None:
    import os

    rows = [
        {"prompt": text, "output_tokens_count": 8}
        for text in ("the cat sat on the mat", "a dog met a cat", "hello you are kind") * 4
    ]
    scenario = {
        "metadata": {"name": "moe-ep-short", "description": "a short run against moe-worker serve"},
        "spec": {
            "backend": {
                "kind": "openai_http",
                "target": url,
                "model": checkpoint.name,
                "request_format": "/v1/completions",
                "stream": True,
            },
            "profile": {"kind": "concurrent", "streams": [2]},
            "data": [{"kind": "in_memory_dict_list", "data": rows}],
            "tokenizer": {"kind": "huggingface_auto", "model": str(checkpoint)},
            "constraints": [{"kind": "max_requests", "count": len(rows)}],
            "outputs": [{"kind": "json", "path": str(tmp_path / "report.json")}],
        },
        "benchmarks": [{}],
    }
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    done = subprocess.run(
        [client_command("guidellm"), "run", "-c", str(tmp_path / "scenario.json")],
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (benchmark,) = json.loads((tmp_path / "report.json").read_text())["benchmarks"]
    assert len(benchmark["requests"]["successful"]) == len(rows)
    assert not benchmark["requests"]["errored"]
    for figure in ("time_to_first_token_ms", "inter_token_latency_ms"):
        stats = benchmark["metrics"][figure]["successful"]
        assert stats["count"] > 0 and stats["median"] > 0, (figure, stats)
    assert benchmark["metrics"]["output_token_count"]["successful"]["total_sum"] == 8 * len(rows)
