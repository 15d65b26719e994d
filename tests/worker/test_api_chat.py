"""The chat API, the completions API's new parameters (logprobs, echo, n), /tokenize and
/detokenize, X-Request-Id and the serving metrics, through real uvicorn servers and the official
`openai` client, over the scripted backend (`api_double`: its tokens and log-probabilities are a
fixed function of the request)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from api_double import EOS, ScriptedBackend, make_card, scripted_logprob
from chat_fixtures import save_chat_tokenizer
from openai_checks import assert_error, client, raw

from moe_worker.api import ServerHandle, create_openai_app, start
from moe_worker.api.chat_template import load_chat_template
from moe_worker.serving.generation import ServingLoad

MODEL = "tiny-moe"
HELLO = [{"role": "user", "content": "hello the cat"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_tokenizer(tmp_path_factory.mktemp("chat-checkpoint"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module")
def words(tokenizer: Any) -> list[int]:
    """What the scripted model answers: "the dog sat on the mat"."""
    return tokenizer.encode("the dog sat on the mat", add_special_tokens=False).ids


@pytest.fixture
def servers() -> Iterator[list[ServerHandle]]:
    handles: list[ServerHandle] = []
    yield handles
    for handle in handles:
        handle.stop()


def serve(servers: list[ServerHandle], backend: ScriptedBackend) -> str:
    handle = start(create_openai_app(backend), "127.0.0.1", 0, name="openai")
    servers.append(handle)
    return handle.url


@pytest.fixture
def backend(checkpoint: Path, tokenizer: Any, words: list[int]) -> ScriptedBackend:
    card = make_card(
        vocab=tokenizer.get_vocab_size(),
        max_context=64,
        tokenizer_path=str(checkpoint / "tokenizer.json"),
    )
    return ScriptedBackend(card, script=lambda request: words)


@pytest.fixture
def url(servers: list[ServerHandle], backend: ScriptedBackend) -> str:
    return serve(servers, backend)


def rendered(checkpoint: Path, tokenizer: Any, messages: list[dict[str, str]]) -> tuple[int, ...]:
    template = load_chat_template(make_card(tokenizer_path=str(checkpoint / "tokenizer.json")))
    assert template is not None
    text = template.render(messages, add_generation_prompt=True)
    return tuple(tokenizer.encode(text, add_special_tokens=False).ids)


def test_chat_renders_the_template_and_answers_a_message(
    url: str, backend: ScriptedBackend, checkpoint: Path, tokenizer: Any, words: list[int]
) -> None:
    result = client(url).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6)
    assert backend.submitted[-1].prompt_token_ids == rendered(checkpoint, tokenizer, HELLO)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    (choice,) = result.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "the dog sat on the mat"
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(backend.submitted[-1].prompt_token_ids)
    assert result.usage.completion_tokens == len(words)


def test_chat_streamed_role_first_then_text_then_usage(url: str, backend: ScriptedBackend) -> None:
    stream = client(url).chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_completion_tokens=6,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    *content, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 12
    texts: dict[int, str] = {}
    for index in (0, 1):
        mine = [c.choices[0] for c in content if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert all(c.delta.role is None for c in mine[1:])
        assert [c.finish_reason for c in mine].count("length") == 1
        assert mine[-1].finish_reason == "length"
        texts[index] = "".join(c.delta.content or "" for c in mine)
    assert texts == {0: "the dog sat on the mat", 1: "the dog sat on the mat"}


def test_chat_parameters_reach_the_engine(url: str, backend: ScriptedBackend) -> None:
    sdk = client(url)
    result = sdk.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=9,
        max_completion_tokens=4,
        temperature=0.5,
        top_p=0.8,
        seed=7,
        n=3,
        user="someone",
        stop=["on"],
        logprobs=True,
        top_logprobs=2,
        extra_body={"top_k": 3, "stop_token_ids": [5], "ignore_eos": True},
    )
    requests = backend.submitted[-3:]
    assert [r.sampling.seed for r in requests] == [7, 8, 9]
    assert [r.prefill_from for r in requests] == [None] + [requests[0].request_id] * 2
    s = requests[0].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k) == (4, 0.5, 0.8, 3)
    assert (s.stop_token_ids, s.ignore_eos, s.logprobs, s.prompt_logprobs) == ((5,), True, 2, None)
    assert [c.index for c in result.choices] == [0, 1, 2]
    for choice in result.choices:  # "on", the 4th token, is a stop string: the text ends before
        assert choice.message.content == "the dog sat "
        assert choice.finish_reason == "stop"
        assert choice.logprobs is not None and choice.logprobs.content is not None
        tokens = ["the", "dog", "sat", "on"]
        assert [c.token for c in choice.logprobs.content] == tokens
        for i, entry in enumerate(choice.logprobs.content):
            assert entry.logprob == -0.5 * (i + 1)
            assert entry.bytes == list(tokens[i].encode())
            assert [t.logprob for t in entry.top_logprobs] == [
                -0.5 * (i + 1) - 1,
                -0.5 * (i + 1) - 2,
            ]
    stopped = sdk.chat.completions.create(model=MODEL, messages=HELLO, stop="sat", max_tokens=6)
    assert stopped.choices[0].message.content == "the dog "
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"n": 17}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.role"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"max_completion_tokens": 100}, "max_tokens"),
        ({"model": "other"}, "model"),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
def test_chat_refusals_name_the_parameter(url: str, change: dict[str, Any], param: str) -> None:
    status, body = raw(url, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, **change})
    assert_error(status, body, 404 if param == "model" else 400, param)


def test_chat_without_a_template_names_the_fix(
    servers: list[ServerHandle], tmp_path: Path, backend: ScriptedBackend
) -> None:
    bare = save_chat_tokenizer(tmp_path / "bare", template=None)
    card = make_card(tokenizer_path=str(bare / "tokenizer.json"), vocab=64)
    url = serve(servers, ScriptedBackend(card))
    status, body = raw(url, "/v1/chat/completions", {"model": MODEL, "messages": HELLO})
    assert_error(status, body, 400, "messages")
    assert "--chat-template" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client(url).chat.completions.create(model=MODEL, messages=HELLO)


def legacy_top(tokenizer: Any, position: int, token: int, top: int) -> dict[str, float]:
    """The scripted log-probabilities in the legacy shape: alternatives and the token."""
    entry = scripted_logprob(position, token, top)
    shaped = {tokenizer.decode([t], skip_special_tokens=False): lp for t, lp in entry.top}
    return {**shaped, tokenizer.decode([token], skip_special_tokens=False): entry.logprob}


def test_completion_logprobs_echo_and_n(
    url: str, backend: ScriptedBackend, tokenizer: Any, words: list[int]
) -> None:
    sdk = client(url)
    prompt = tokenizer.encode("a cat", add_special_tokens=False).ids
    result = sdk.completions.create(
        model=MODEL, prompt=[prompt, prompt[:1]], max_tokens=2, logprobs=2, n=2, seed=3
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    requests = backend.submitted[-4:]
    assert [r.prompt_token_ids for r in requests] == [tuple(prompt)] * 2 + [tuple(prompt[:1])] * 2
    assert [r.prefill_from for r in requests] == [
        None,
        requests[0].request_id,
        None,
        requests[2].request_id,
    ]
    assert [r.sampling.seed for r in requests] == [3, 4, 3, 4]
    assert result.usage is not None and result.usage.prompt_tokens == 3  # once per prompt
    logprobs = result.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["the", "dog"]
    assert logprobs.token_logprobs == [-0.5, -1.0]
    assert logprobs.top_logprobs == [legacy_top(tokenizer, i, words[i], 2) for i in (0, 1)]
    assert logprobs.text_offset == [len("a cat"), len("a cat") + 3]  # from the prompt's start
    echoed = sdk.completions.create(
        model=MODEL, prompt="a cat", max_tokens=1, logprobs=1, echo=True
    )
    choice = echoed.choices[0]
    assert choice.text == "a catthe"
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["<s>", "a", "cat", "the"]  # the prompt as tokenized
    with_bos = tokenizer.encode("a cat").ids
    scored = [scripted_logprob(-1, t, 1).logprob for t in with_bos[1:]]
    assert choice.logprobs.token_logprobs == [None, *scored, -0.5]
    assert choice.logprobs.top_logprobs is not None
    assert choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.top_logprobs[1] == legacy_top(tokenizer, -1, with_bos[1], 1)
    assert choice.logprobs.text_offset == [0, 3, 4, 7]
    assert backend.submitted[-1].sampling.prompt_logprobs == 1


def test_echo_with_max_tokens_0_scores_the_prompt_only(url: str, backend: ScriptedBackend) -> None:
    """What lm-eval's loglikelihood may send: token ids, echo, logprobs, max_tokens 0 (or 1)."""
    status, body = raw(
        url,
        "/v1/completions",
        {"model": MODEL, "prompt": [[3, 4, 5]], "max_tokens": 0, "logprobs": 1, "echo": True},
    )
    assert status == 200, body
    (choice,) = body["choices"]
    assert choice["token_ids"] == [] and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert len(choice["logprobs"]["token_logprobs"]) == 3
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    assert backend.submitted[-1].sampling.max_tokens == 1


def test_streamed_echo_and_logprobs(url: str) -> None:
    chunks = list(
        client(url).completions.create(
            model=MODEL, prompt="a cat", max_tokens=3, logprobs=0, echo=True, stream=True
        )
    )
    assert chunks[0].choices[0].text.startswith("a cat")
    tokens = [
        t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])
    ]
    assert tokens == ["<s>", "a", "cat", "the", "dog", "sat"]
    assert "".join(c.choices[0].text for c in chunks) == "a catthe dog sat"


def test_tokenize_and_detokenize_in_vllms_shapes(
    url: str, tokenizer: Any, checkpoint: Path
) -> None:
    status, body = raw(url, "/tokenize", {"prompt": "the cat", "return_token_strs": True})
    assert status == 200 and body["tokens"] == tokenizer.encode("the cat").ids
    assert body["count"] == 3 and body["max_model_len"] == 64
    assert body["token_strs"] == ["<s>", "the", "cat"]
    status, body = raw(url, "/tokenize", {"prompt": "the cat", "add_special_tokens": False})
    assert body["tokens"] == tokenizer.encode("the cat", add_special_tokens=False).ids
    status, body = raw(url, "/tokenize", {"model": MODEL, "messages": HELLO})
    assert status == 200 and tuple(body["tokens"]) == rendered(checkpoint, tokenizer, HELLO)
    first = body["tokens"][:3]
    status, body = raw(url, "/detokenize", {"tokens": first})
    assert (status, body) == (200, {"prompt": tokenizer.decode(first, skip_special_tokens=False)})
    status, body = raw(url, "/detokenize", {"tokens": [10**6]})
    assert_error(status, body, 400, "tokens")
    status, body = raw(url, "/tokenize", {"prompt": "x", "model": "other"})
    assert_error(status, body, 404, "model")
    with urllib.request.urlopen(f"{url}/tokenizer_info") as response:
        info = json.loads(response.read())
    assert (info["eos_token"], info["bos_token"]) == ("</s>", "<s>")
    assert "raise_exception" in info["chat_template"] and info["model_max_length"] == 64


def test_request_id_is_echoed_or_made(url: str) -> None:
    def ask(headers: dict[str, str], body: dict[str, Any]) -> str | None:
        request = urllib.request.Request(
            f"{url}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", **headers},
        )
        try:
            with urllib.request.urlopen(request) as response:
                return response.headers.get("X-Request-Id")
        except urllib.error.HTTPError as error:
            return error.headers.get("X-Request-Id")

    good = {"model": MODEL, "prompt": [2], "max_tokens": 1}
    assert ask({"X-Request-Id": "trace-42"}, good) == "trace-42"
    assert ask({"X-Request-Id": "trace-43"}, {**good, "max_tokens": -1}) == "trace-43"
    made = ask({}, good)
    assert made is not None and len(made) == 32
    assert ask({"X-Request-Id": "bad id\x01"}, good) != "bad id\x01"


def metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted({"model_name": MODEL, **labels}.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in\n{text}")


def test_serving_metrics_after_known_traffic(
    url: str, backend: ScriptedBackend, words: list[int]
) -> None:
    backend.load_now = ServingLoad(running=3, waiting=2, kv_cache_usage=0.25)
    assert metric(url, "vllm:num_requests_running") == 3
    assert metric(url, "vllm:num_requests_waiting") == 2
    assert metric(url, "vllm:kv_cache_usage_perc") == 0.25
    sdk = client(url)
    sdk.completions.create(model=MODEL, prompt=[3, 4, 5], max_tokens=4)  # length, 4 tokens
    sdk.completions.create(model=MODEL, prompt=[[3], [4, 5]], max_tokens=2)  # 2 x length
    backend.script = lambda request: [7, EOS]
    sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)  # stop, 2 tokens
    chat_prompt = len(backend.submitted[-1].prompt_token_ids)
    assert metric(url, "vllm:request_success_total", finished_reason="length") == 3
    assert metric(url, "vllm:request_success_total", finished_reason="stop") == 1
    assert metric(url, "vllm:prompt_tokens_total") == 3 + 1 + 2 + chat_prompt
    assert metric(url, "vllm:generation_tokens_total") == 4 + 2 + 2 + 2
    assert metric(url, "vllm:time_to_first_token_seconds_count") == 4
    assert metric(url, "vllm:e2e_request_latency_seconds_count") == 4
    assert metric(url, "vllm:request_queue_time_seconds_count") == 4
    assert metric(url, "vllm:inter_token_latency_seconds_count") == 3 + 1 + 1 + 1
    backend.script = lambda request: words  # "the dog sat on the mat": a stop string ends it
    sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stop="dog")
    assert metric(url, "vllm:request_success_total", finished_reason="stop") == 2
