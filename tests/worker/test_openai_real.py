"""The official `openai` client against a REAL group: two `moe-worker serve` processes (gloo)
serving a SeedMLP checkpoint that ships a tokenizer trained here. The API's own client checks
(`openai_checks`) run unchanged against rank 0's OpenAI app; answers equal the world-1
generator's, bad requests get OpenAI's error shape naming the field, the group keeps serving.
A second group serves a tiny DeepSeek-V3 (MLA, shared experts, a dense first layer) saved by
transformers, its shape declared through the pod variables: answers equal `generate()`'s."""

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

from moe_contract import env
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


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny DeepSeek-V3 of the trained tokenizer's vocabulary, saved by transformers."""
    from hf_tiny import deepseek_v3
    from tokenizers import Tokenizer

    words = train_tokenizer(tmp_path_factory.mktemp("deepseek-tokenizer"))
    torch.manual_seed(0)
    with torch.no_grad():
        hf = deepseek_v3(vocab_size=Tokenizer.from_file(str(words)).get_vocab_size()).eval()
    hf.config.eos_token_id = hf.generation_config.eos_token_id = None  # whole answers compared
    path = tmp_path_factory.mktemp("tiny-deepseek-v3")
    hf.save_pretrained(path)
    shutil.copy(words, path / "tokenizer.json")
    return path, hf


def test_a_deepseek_v3_checkpoint_through_the_official_client(
    tmp_path_factory: pytest.TempPathFactory, deepseek: tuple[Path, object]
) -> None:
    from tokenizers import Tokenizer

    path, hf = deepseek
    tmp = Path(tmp_path_factory.mktemp("deepseek-cluster"))
    (tmp / "keys").write_text(f"{KEY}\n")
    shape = HFCheckpoint(path).spec.shape  # declared as the operator declares it, every field
    assert shape.kv_lora_rank == 16 and shape.dense_layers == 1
    variables = {
        **env.shape_to_env(shape),
        "MOE_CHECKPOINT": str(path),
        "MOE_API_KEYS_PATH": str(tmp / "keys"),
        "MOE_KV_CACHE_TOKENS": "512",
        "MOE_MAX_BATCH_TOKENS": "16",
    }
    cluster = Cluster(tmp, 2, variables)
    try:
        cluster.wait_ready()
        url = cluster.api_url.removesuffix("/v1")
        assert served_model(url, KEY) == (path.name, 128)
        for prompt in ([2, 3, 4], [9, 8, 7, 6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11]):
            ids = check_stream(url, path.name, prompt, max_tokens=12, api_key=KEY)
            assert ids == generate(hf, prompt, 12)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        result = client(url, KEY).completions.create(
            model=path.name, prompt="the cat sat on", max_tokens=6, temperature=0
        )
        prompt = tokenizer.encode("the cat sat on").ids
        assert token_ids(result.choices[0]) == generate(hf, prompt, 6)
        assert result.choices[0].text == tokenizer.decode(generate(hf, prompt, 6))
    finally:
        cluster.stop()


def generate(hf: object, prompt: list[int], new_tokens: int) -> list[int]:
    out = hf.generate(  # type: ignore[attr-defined]
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False
    )
    return list(out[0, len(prompt) :].tolist())
