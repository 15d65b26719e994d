"""The official `openai` client against a REAL group: two `moe-worker serve` processes (gloo)
serving a SeedMLP checkpoint that ships a tokenizer trained here. The API's own client checks
(`openai_checks`) run unchanged against rank 0's OpenAI app; answers equal the world-1
generator's, bad requests get OpenAI's error shape naming the field, the group keeps serving."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from api_double import train_tokenizer
from openai_checks import (
    assert_error,
    check_batch,
    check_completion,
    check_refusals,
    check_stream,
    client,
    raw,
    served_model,
    token_ids,
)
from worker_harness import Cluster

from moe_contract.shape import ModelShape
from moe_worker.bench.generator import Generator, Request
from moe_worker.ep.sampling import SamplingParams
from moe_worker.models.checkpoint import HFCheckpoint, write_checkpoint
from moe_worker.models.weights import SyntheticWeights

pytestmark = pytest.mark.distributed

KEY = "sk-test-key"
CONTEXT = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer

    words = train_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    vocab = Tokenizer.from_file(str(words)).get_vocab_size()
    shape = ModelShape(
        layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, vocab_size=vocab
    )
    source = SyntheticWeights.for_shape(shape, seed=5, max_context=CONTEXT)
    path = write_checkpoint(tmp_path_factory.mktemp("tiny-seed-moe"), source)
    shutil.copy(words, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[Cluster]:
    tmp = Path(tmp_path_factory.mktemp("cluster"))
    (tmp / "keys").write_text(f"{KEY}\n")
    env = {
        "MOE_CHECKPOINT": str(checkpoint),
        "MOE_API_KEYS_PATH": str(tmp / "keys"),
        "MOE_KV_CACHE_TOKENS": "512",
        "MOE_MAX_BATCH_TOKENS": "16",
    }
    c = Cluster(tmp, 2, env)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def url(cluster: Cluster) -> str:
    return cluster.api_url.removesuffix("/v1")


def reference(checkpoint: Path, prompt: list[int], max_tokens: int) -> list[int]:
    torch.set_num_threads(1)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    generator = Generator.from_source(HFCheckpoint(checkpoint), 256)
    return generator.generate([Request("r", tuple(prompt), params)])["r"].token_ids


def test_the_served_model_and_its_context(url: str, checkpoint: Path) -> None:
    assert served_model(url, KEY) == (checkpoint.name, CONTEXT)


def test_token_prompts_streamed_and_not_equal_the_world_1_generator(
    url: str, checkpoint: Path
) -> None:
    model = checkpoint.name
    for prompt in ([2, 3, 4], [5], [9, 8, 7, 6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2, 10]):
        ids = check_completion(url, model, prompt, max_tokens=6, api_key=KEY)
        assert ids == reference(checkpoint, prompt, 6)[: len(ids)]
        assert check_stream(url, model, prompt, max_tokens=6, api_key=KEY) == ids
    check_batch(url, model, [[2, 3], [4, 5, 6, 7], [8]], max_tokens=4, api_key=KEY)


def test_text_prompts_through_the_checkpoints_tokenizer(url: str, checkpoint: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    sdk = client(url, KEY)
    result = sdk.completions.create(
        model=checkpoint.name, prompt="the cat sat on", max_tokens=5, temperature=0
    )
    choice = result.choices[0]
    ids = token_ids(choice)
    prompt = tokenizer.encode("the cat sat on").ids
    assert result.usage is not None and result.usage.prompt_tokens == len(prompt)
    assert ids == reference(checkpoint, prompt, 5)[: len(ids)]
    if choice.finish_reason == "length":
        assert choice.text == tokenizer.decode(ids)
    streamed = sdk.completions.create(
        model=checkpoint.name, prompt="the cat sat on", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_sampled_completions_follow_their_seed(url: str, checkpoint: Path) -> None:
    sdk = client(url, KEY)
    answers = [
        token_ids(
            sdk.completions.create(
                model=checkpoint.name,
                prompt=[3, 4, 5],
                max_tokens=8,
                temperature=0.9,
                top_p=0.95,
                seed=seed,
                extra_body={"top_k": 12, "ignore_eos": True},
            ).choices[0]
        )
        for seed in (1, 1, 2)
    ]
    assert answers[0] == answers[1] and len(answers[0]) == 8
    params = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=12, seed=1, max_tokens=8, ignore_eos=True
    )
    generator = Generator.from_source(HFCheckpoint(checkpoint), 256)
    assert answers[0] == generator.generate([Request("r", (3, 4, 5), params)])["r"].token_ids


def test_bad_requests_get_the_openai_error_shape_and_the_group_keeps_serving(
    url: str, checkpoint: Path, cluster: Cluster
) -> None:
    check_refusals(url, checkpoint.name, max_context=CONTEXT, api_key=KEY)
    good = {"model": checkpoint.name, "prompt": [2, 3], "max_tokens": 2}
    # prompt + max_tokens past the context: the engine's limit, named.
    status, body = raw(
        url, "/v1/completions", {**good, "prompt": [2] * 40, "max_tokens": 30}, api_key=KEY
    )
    assert_error(status, body, 400, "max_tokens")
    for key in ("sk-wrong", None):
        status, body = raw(url, "/v1/completions", good, api_key=key)
        assert_error(status, body, 401, None)
    check_completion(url, checkpoint.name, [2, 3], max_tokens=2, api_key=KEY)
    assert all(proc.poll() is None for proc in cluster.procs)
    assert all(cluster.request(rank, "/healthz")[0] == 200 for rank in range(cluster.world))
