"""Issue 19, items 1, 2 and 9, against a real uvicorn server over the scripted backend: every list
a request carries is bounded (a 400 naming the parameter and the bound, before anything reaches
the engine, while other requests go on), a text too long to fit is refused before it is
tokenized and tokenizing never holds the event loop, and clients see the rule they broke and a
plain message when the group fails, never an engine's internals."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from api_double import WAIT, ScriptedBackend, make_card, train_tokenizer
from openai_checks import assert_error, check_completion, client, raw, token_ids

from moe_worker.api import ServerHandle, create_openai_app, limits, prompts, start

CONTEXT = 32


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture
def backend(tokenizer_path: Path) -> ScriptedBackend:
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    return ScriptedBackend(
        make_card(vocab=vocab, max_context=CONTEXT, tokenizer_path=str(tokenizer_path))
    )


@pytest.fixture
def url(backend: ScriptedBackend) -> Iterator[str]:
    handle: ServerHandle = start(create_openai_app(backend), "127.0.0.1", 0, name="openai")
    yield handle.url
    handle.stop()


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-moe", "prompt": [2], "max_tokens": 2, **fields}


MAX_CHARS = limits.CHARS_PER_TOKEN * CONTEXT


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"stop_token_ids": [2] * 257}, "stop_token_ids", "257 token ids, at most 256"),
        ({"stop": ["x"] * 10_000}, "stop", "10000 stop strings, at most 16"),
        ({"stop": "x" * 257}, "stop", "257 characters, at most 256"),
        ({"stop": ["a", "x" * 300]}, "stop", "stop[1]: 300 characters, at most 256"),
        ({"prompt": [[2]] * 65}, "prompt", "65 prompts, at most 64"),
        ({"prompt": [2] * CONTEXT}, "prompt", f"context of {CONTEXT} tokens"),
        ({"prompt": [[2], [2] * 40]}, "prompt", "prompt[1]: 40 tokens leave no room"),
        ({"prompt": "a" * (MAX_CHARS + 1)}, "prompt", f"at most {MAX_CHARS}"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "301 entries, at most 300"),
    ],
)
def test_each_list_is_bounded_naming_the_parameter_and_the_bound(
    url: str, backend: ScriptedBackend, fields: dict[str, Any], param: str, says: str
) -> None:
    status, body = raw(url, "/v1/completions", completion(**fields))
    assert_error(status, body, 400, param)
    assert says in body["error"]["message"], body
    assert backend.submitted == []
    assert raw(url, "/v1/completions", completion())[0] == 200  # at the bound is fine
    at_bound = {
        "stop_token_ids": [2] * 256,
        "stop": ["x" * 256] * 16,
        "prompt": [[2] * (CONTEXT - 1)] * 64,
    }
    if param in at_bound:
        fields = {param: at_bound[param], "max_tokens": 1}
        status, body = raw(url, "/v1/completions", completion(**fields))
        assert status == 200, body


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"prompt": [-1]}, "prompt", "prompt[0]: token id -1 is negative"),
        ({"prompt": [[2], [3, -1]]}, "prompt", "prompt[1][1]: token id -1 is negative"),
        ({"prompt": [2.5]}, "prompt", "prompt[0]: must be a token id (an integer)"),
        ({"prompt": [True]}, "prompt", "got a boolean"),
        ({"prompt": [[2], "text", 3]}, "prompt", "prompt[1]: is a string but prompt[0] is a list"),
        ({"prompt": {"a": 1}}, "prompt", "must be text, a list of token ids"),
        ({"prompt": []}, "prompt", "prompt: is empty"),
        ({"prompt": [9999]}, "prompt", "token id 9999 is outside the vocabulary"),
        ({"stop": 5}, "stop", "must be a string or a list of strings"),
        ({"stop": ["a", 5]}, "stop", "stop[1]: must be a string"),
        ({"stop": ""}, "stop", "stop: is empty"),
        ({"stop_token_ids": [2, -3]}, "stop_token_ids", "stop_token_ids[1]: token id -3"),
        ({"stop_token_ids": "5"}, "stop_token_ids", "must be a list of token ids"),
    ],
)
def test_union_fields_name_the_rule_broken(
    url: str, fields: dict[str, Any], param: str, says: str
) -> None:
    status, body = raw(url, "/v1/completions", completion(**fields))
    assert_error(status, body, 400, param)
    message = body["error"]["message"]
    assert says in message and "Input should be" not in message, message


def test_the_issues_stop_ids_request_is_refused_before_the_engine_while_another_runs(
    url: str, backend: ScriptedBackend
) -> None:
    # A small request is mid-generation (held after its first token) ...
    backend.holds = lambda request: request.prompt_token_ids == (3,)
    small: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: small.update(
            result=client(url).completions.create(model="tiny-moe", prompt=[3], max_tokens=4)
        )
    )
    thread.start()
    while not backend.submitted:
        backend.abort_seen.wait(0.01)
    # ... when the issue's request comes: 64 prompts x 400k stop ids (1.5 MB).
    with pytest.raises(openai.BadRequestError) as refused:
        client(url).completions.create(
            model="tiny-moe",
            prompt=[[2, 3, 4]] * 64,
            max_tokens=4,
            extra_body={"stop_token_ids": [2 + i % 20 for i in range(400_000)]},
        )
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "stop_token_ids", error
    assert "400000 token ids, at most 256" in error["message"]
    assert [r.prompt_token_ids for r in backend.submitted] == [(3,)]  # nothing else reached it
    backend.release.set()
    thread.join(WAIT)
    assert len(token_ids(small["result"].choices[0])) == 4


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[str], threading.Event]]:
    """A spy on the encoder thread's function: the texts it got; for one containing "sat", it
    waits on the event first (a long tokenization, held as long as the test likes)."""
    seen: list[str] = []
    release = threading.Event()
    real = prompts.encode_without_gil

    def spy(tokenizer: Any, text: str, special_tokens: bool = True) -> list[int]:
        seen.append(text)
        if "sat" in text:
            release.wait(WAIT)
        return real(tokenizer, text, special_tokens)

    monkeypatch.setattr(prompts, "encode_without_gil", spy)
    yield seen, release
    release.set()


def test_a_big_text_is_refused_before_tokenizing_and_tokenizing_holds_no_one_up(
    url: str, backend: ScriptedBackend, encodings: tuple[list[str], threading.Event]
) -> None:
    seen, release = encodings
    # Too long to fit the context at any tokenizer's rate: refused, never tokenized.
    status, body = raw(url, "/v1/completions", completion(prompt="the cat " * 10_000))
    assert_error(status, body, 400, "prompt")
    assert "refused before tokenizing" in body["error"]["message"]
    assert seen == []
    # A text that is being tokenized (held on the encoder's thread) ...
    slow: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: slow.update(
            answer=raw(url, "/v1/completions", completion(prompt="the cat sat on the mat"))
        )
    )
    thread.start()
    deadline = time.monotonic() + WAIT
    while not seen and time.monotonic() < deadline:
        release.wait(0.01)
    assert seen, "the text never reached the encoder's thread"
    # ... holds neither the event loop nor other requests: a token-id request is answered, a
    # refusal too, while it waits.
    check_completion(url, "tiny-moe", [2, 3])
    assert raw(url, "/v1/completions", completion(prompt=[-1]))[0] == 400
    assert "answer" not in slow
    release.set()
    thread.join(WAIT)
    assert slow["answer"][0] == 200, slow
    assert backend.submitted[-1].prompt_token_ids == tuple(_ids(backend, seen[0]))


def _ids(backend: ScriptedBackend, text: str) -> list[int]:
    from tokenizers import Tokenizer

    assert backend.card.tokenizer_path is not None
    return Tokenizer.from_file(backend.card.tokenizer_path).encode(text).ids  # type: ignore[no-any-return]


def test_encoding_without_the_gil_gives_the_tokenizers_ids(tokenizer_path: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    for text in ("the cat sat on the mat", "a dog and unknown words", " ", "the " * 1000):
        assert prompts.encode_without_gil(tokenizer, text) == tokenizer.encode(text).ids


GLOO = (
    "the serving loop failed: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"
    "pair.cc:537] Read error [127.0.0.1]:4755: Connection reset by peer"
)


@pytest.mark.parametrize("stream", [False, True])
def test_a_group_failure_is_a_plain_message_and_the_detail_is_logged(
    url: str, backend: ScriptedBackend, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    backend.end_with = ("error", GLOO)
    with caplog.at_level(logging.ERROR, "moe_worker.api"), pytest.raises(openai.APIError) as failed:
        answer = client(url).completions.create(
            model="tiny-moe", prompt=[2], max_tokens=3, stream=stream
        )
        if stream:
            list(answer)  # type: ignore[call-overload]
    message = str(failed.value)
    assert "generation failed in the worker group" in message
    for internal in ("/__w", "pair.cc", "127.0.0.1", "4755", "Read error"):
        assert internal not in message, message
    request_id = backend.submitted[-1].request_id
    assert request_id in message  # what to look for in the log
    assert any(request_id in r.getMessage() and GLOO in r.getMessage() for r in caplog.records)
