"""The OpenAI app through real uvicorn servers on 127.0.0.1, driven by the official client."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from api_double import EOS, WAIT, ScriptedBackend, make_card, train_tokenizer
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

from moe_worker.api import ServerHandle, create_openai_app, start
from moe_worker.serving.generation import InvalidRequest, NotReady, QueueFull, ServingLoad

Serve = Callable[..., ServerHandle]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start the OpenAI app over a backend on a free port; every server stops after the test."""
    handles: list[ServerHandle] = []

    def run(backend: ScriptedBackend, **options: Any) -> ServerHandle:
        handle = start(create_openai_app(backend, **options), "127.0.0.1", 0, name="openai")
        handles.append(handle)
        return handle

    yield run
    for handle in handles:
        handle.stop()


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend(make_card())


@pytest.fixture
def url(serve: Serve, backend: ScriptedBackend) -> str:
    return serve(backend).url


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("checkpoint"))


def test_models_lists_the_served_model(url: str) -> None:
    assert served_model(url) == ("tiny-moe", 32)


def test_token_prompts_streamed_and_not(url: str, backend: ScriptedBackend) -> None:
    ids = check_stream(url, "tiny-moe", [5, 6, 7], max_tokens=4)
    assert ids == backend.script(backend.submitted[0])
    assert all(r.prompt_token_ids == (5, 6, 7) for r in backend.submitted)


def test_batch_prompts_give_one_choice_each(url: str, backend: ScriptedBackend) -> None:
    check_batch(url, "tiny-moe", [[2], [3, 4], [5, 6, 7]])
    assert len({r.request_id for r in backend.submitted}) == len(backend.submitted)


def test_refusals_have_the_openai_shape_and_the_server_keeps_serving(url: str) -> None:
    check_refusals(url, "tiny-moe", max_context=32)


def test_sampling_parameters_reach_the_backend(url: str, backend: ScriptedBackend) -> None:
    result = client(url).completions.create(
        model="tiny-moe",
        prompt=[4, 5],
        max_tokens=3,
        temperature=0.7,
        top_p=0.9,
        seed=1234,
        user="someone",
        extra_body={"top_k": 5, "stop_token_ids": [9], "ignore_eos": True},
    )
    sampling = backend.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.7, 0.9, 5)
    assert (sampling.seed, sampling.max_tokens) == (1234, 3)
    assert (sampling.stop_token_ids, sampling.ignore_eos) == ((9,), True)
    assert token_ids(result.choices[0]) == backend.script(backend.submitted[-1])
    # Defaults: OpenAI's (temperature 1, max_tokens 16 or what the context leaves), no seed.
    client(url).completions.create(model="tiny-moe", prompt=[2] * 20)
    sampling = backend.submitted[-1].sampling
    assert (sampling.temperature, sampling.seed, sampling.max_tokens) == (1.0, None, 12)


def test_a_stop_token_ends_the_choice(serve: Serve) -> None:
    backend = ScriptedBackend(make_card(), script=lambda r: [7, 8, EOS, 9])
    result = client(serve(backend).url).completions.create(
        model="tiny-moe", prompt=[2], max_tokens=4
    )
    assert token_ids(result.choices[0]) == [7, 8, EOS]
    assert result.choices[0].finish_reason == "stop"


def test_text_prompts_and_text_answers(serve: Serve, tokenizer_path: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    words = tokenizer.encode("the dog sat on the mat").ids
    card = make_card(vocab=tokenizer.get_vocab_size(), tokenizer_path=str(tokenizer_path))
    backend = ScriptedBackend(card, script=lambda r: words)
    url = serve(backend).url
    sdk = client(url)
    result = sdk.completions.create(model="tiny-moe", prompt="a cat", max_tokens=6)
    assert backend.submitted[-1].prompt_token_ids == tuple(tokenizer.encode("a cat").ids)
    assert result.choices[0].text == "the dog sat on the mat"
    assert token_ids(result.choices[0]) == words
    assert result.usage is not None and result.usage.prompt_tokens == 2
    # A list of texts, streamed: the text arrives in pieces that add up.
    stream = sdk.completions.create(
        model="tiny-moe", prompt=["a cat", "the end"], max_tokens=6, stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == ["the dog sat on the mat"] * 2
    # A stop string ends the choice before it, streamed or not; its token ends the token ids.
    result = sdk.completions.create(model="tiny-moe", prompt="a", max_tokens=6, stop=["on"])
    assert result.choices[0].text == "the dog sat "
    assert result.choices[0].finish_reason == "stop"
    assert token_ids(result.choices[0]) == words[:4]
    # ... also when the stop string comes with the last token the engine was asked for.
    result = sdk.completions.create(model="tiny-moe", prompt="a", max_tokens=4, stop="on")
    assert (result.choices[0].text, result.choices[0].finish_reason) == ("the dog sat ", "stop")
    streamed = "".join(
        c.choices[0].text
        for c in sdk.completions.create(
            model="tiny-moe", prompt="a", max_tokens=6, stop="sat on", stream=True
        )
    )
    assert streamed == "the dog "


def test_text_needs_a_tokenizer(url: str) -> None:
    status, body = raw(url, "/v1/completions", {"model": "tiny-moe", "prompt": "hello"})
    assert_error(status, body, 400, "prompt")
    status, body = raw(url, "/v1/completions", {"model": "tiny-moe", "prompt": [2], "stop": "x"})
    assert_error(status, body, 400, "stop")
    result = client(url).completions.create(model="tiny-moe", prompt=[2], max_tokens=2)
    assert result.choices[0].text == "" and len(token_ids(result.choices[0])) == 2


@pytest.mark.parametrize(
    ("refusal", "status", "param"),
    [
        (InvalidRequest("max_tokens: over the KV budget", "max_tokens"), 400, "max_tokens"),
        (QueueFull("the queue is full"), 429, None),
        (NotReady("the group is forming"), 503, None),
    ],
)
def test_admission_errors_map_to_statuses(
    url: str, backend: ScriptedBackend, refusal: Exception, status: int, param: str | None
) -> None:
    backend.refuse = refusal  # type: ignore[assignment]
    got, body = raw(url, "/v1/completions", {"model": "tiny-moe", "prompt": [2]})
    assert_error(got, body, status, param)
    backend.refuse = None
    check_completion(url, "tiny-moe", [2])


def test_a_batch_refused_halfway_aborts_what_was_admitted(
    url: str, backend: ScriptedBackend
) -> None:
    backend.gate.clear()
    backend.refuse, backend.admit = QueueFull("full"), 1
    with pytest.raises(openai.RateLimitError):
        client(url).completions.create(model="tiny-moe", prompt=[[2], [3]], max_tokens=2)
    assert backend.aborted == {backend.submitted[0].request_id}
    backend.gate.set()


def test_engine_failures_are_errors_without_tracebacks(url: str, backend: ScriptedBackend) -> None:
    backend.end_with = ("error", "KV cache corrupted")
    with pytest.raises(openai.InternalServerError) as failed:
        client(url).completions.create(model="tiny-moe", prompt=[2], max_tokens=3)
    assert "generation failed in the worker group" in str(failed.value)
    assert "KV cache corrupted" not in str(failed.value)  # the log has it (test_api_bounds)
    with pytest.raises(openai.APIError, match="generation failed in the worker group"):
        list(client(url).completions.create(model="tiny-moe", prompt=[2], stream=True))
    backend.end_with = None
    check_completion(url, "tiny-moe", [2])


@pytest.mark.parametrize("stream", [False, True])
def test_a_choice_failing_aborts_its_siblings(
    url: str, backend: ScriptedBackend, stream: bool
) -> None:
    backend.end_with = ("error", "boom")
    backend.fails = lambda request: request.prompt_token_ids == (2,)
    backend.holds = lambda request: request.prompt_token_ids == (3,)
    sdk = client(url)
    with pytest.raises(openai.APIError, match="generation failed"):
        result = sdk.completions.create(model="tiny-moe", prompt=[[2], [3]], stream=stream)
        if stream:
            list(result)  # type: ignore[call-overload]
    held = next(r.request_id for r in backend.submitted if r.prompt_token_ids == (3,))
    assert backend.abort_seen.wait(WAIT) and backend.aborted == {held}
    backend.release.set()


def test_api_keys(serve: Serve, backend: ScriptedBackend, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("first-key\n\nsecond-key\n")
    url = serve(backend, api_keys_path=str(keys)).url
    for key in ("first-key", "second-key"):
        check_completion(url, "tiny-moe", [2], api_key=key)
        assert served_model(url, key)[0] == "tiny-moe"
    for key in (None, "wrong-key", "first-key-but-longer"):
        for path, body in (
            ("/v1/completions", {"model": "tiny-moe", "prompt": [2]}),
            ("/v1/models", None),
        ):
            status, answer = raw(url, path, body, api_key=key)
            assert_error(status, answer, 401, None)
            assert "first-key" not in answer["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong-key").completions.create(model="tiny-moe", prompt=[2])
    assert raw(url, "/health")[0] == 200  # the probe needs no key
    keys.write_text("")  # a key file that is named but empty opens nothing
    assert raw(url, "/v1/models", api_key="first-key")[0] == 401
    keys.write_text("rotated\n")  # read per request: a rotated Secret needs no restart
    assert raw(url, "/v1/models", api_key="rotated")[0] == 200


def test_health_follows_readiness(url: str, backend: ScriptedBackend) -> None:
    assert raw(url, "/health") == (200, {"status": "ok"})
    backend.ready = False
    status, body = raw(url, "/health")
    assert_error(status, body, 503, None)


def test_a_router_reads_the_load_and_the_model(url: str, backend: ScriptedBackend) -> None:
    """smg's load probe (SGLang's /v1/loads schema) and model-info probe, without a key."""
    backend.load_now = ServingLoad(waiting=3, running=5, used_tokens=256, capacity_tokens=1024)
    status, body = raw(url, "/v1/loads?include=core,disagg,queues,memory")
    assert status == 200 and body["dp_rank_count"] == 1
    (rank,) = body["loads"]
    assert (rank["num_waiting_reqs"], rank["num_running_reqs"], rank["num_total_reqs"]) == (3, 5, 8)
    assert (rank["num_used_tokens"], rank["max_total_num_tokens"]) == (256, 1024)
    assert rank["token_usage"] == 0.25
    status, info = raw(url, "/model_info")
    assert status == 200 and info["model_path"] == backend.card.name
    assert info["max_model_len"] == backend.card.max_context and info["is_generation"] is True


def test_a_draining_worker_refuses_new_requests_before_the_body(
    url: str, backend: ScriptedBackend
) -> None:
    """503 with the reason, whatever the body (not even parsed): a router retries elsewhere;
    nothing reaches the backend. Streaming too: the status comes before any event."""
    backend.drain()
    for body in ({"model": "tiny-moe", "prompt": [2], "stream": True}, b"not json"):
        status, answer = raw(url, "/v1/completions", body)
        assert_error(status, answer, 503, None)
        assert "draining" in answer["error"]["message"]
    status, answer = raw(url, "/health")
    assert status == 503 and "draining" in answer["error"]["message"]
    assert backend.submitted == []


def _open_request(url: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_gone_mid_request_aborts_it(
    url: str, backend: ScriptedBackend, stream: bool
) -> None:
    backend.gate.clear()  # no token comes until the client has gone
    body = b'{"model": "tiny-moe", "prompt": [2], "max_tokens": 8, "stream": %s}' % (
        b"true" if stream else b"false"
    )
    sock = _open_request(url, body)
    if stream:
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # the stream has begun
    while not backend.submitted:
        backend.abort_seen.wait(0.05)
    sock.close()
    assert backend.abort_seen.wait(WAIT)
    assert backend.aborted == {backend.submitted[0].request_id}
    backend.gate.set()
    check_completion(url, "tiny-moe", [2])


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": [2.5]}, "prompt"),
        ({"prompt": [[2], "text", 3]}, "prompt"),
        ({"prompt": [[2]] * 65}, "prompt"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
        ({"stream_options": {"bogus": True}}, "stream_options.bogus"),
        ({"stop": ""}, "stop"),
        ({"stop_token_ids": [64]}, "stop_token_ids"),
        ({"top_k": -2}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ],
)
def test_each_invalid_parameter_is_named(url: str, change: dict[str, Any], param: str) -> None:
    status, body = raw(url, "/v1/completions", {"model": "tiny-moe", "prompt": [2], **change})
    assert_error(status, body, 400, param)


def test_neutral_values_of_unsupported_parameters_are_accepted(url: str) -> None:
    neutral = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0}
    status, body = raw(
        url, "/v1/completions", {"model": "tiny-moe", "prompt": [2], "top_k": -1, **neutral}
    )
    assert status == 200, body


def test_a_stalled_generation_is_aborted(serve: Serve, backend: ScriptedBackend) -> None:
    url = serve(backend, stall_timeout=0.2).url
    backend.gate.clear()  # no token ever comes
    with pytest.raises(openai.APIStatusError) as stalled:
        client(url).completions.create(model="tiny-moe", prompt=[2])
    assert stalled.value.status_code == 504
    with pytest.raises(openai.APIError, match="no token"):
        list(client(url).completions.create(model="tiny-moe", prompt=[3], stream=True))
    assert backend.aborted == {r.request_id for r in backend.submitted}
    backend.gate.set()
