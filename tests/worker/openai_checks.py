"""Client-side checks of an OpenAI-compatible server, through the official `openai` package.

Each takes the server's base URL (`http://host:port`, no `/v1`) and holds for any backend: the
API tests run them against a scripted backend, the runtime's against real worker processes. They
ask for greedy sampling (temperature 0) wherever they compare two answers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import openai

TIMEOUT = 60.0


def client(base_url: str, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base_url}/v1", api_key=api_key or "unused", max_retries=0, timeout=TIMEOUT
    )


def raw(
    base_url: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    *,
    api_key: str | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """One plain HTTP request (what no SDK would send: malformed JSON); (status, JSON body)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{base_url}{path}", data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def served_model(base_url: str, api_key: str | None = None) -> tuple[str, int]:
    """(model id, max_model_len) of the one model the server lists."""
    models = client(base_url, api_key).models.list()
    assert [m.object for m in models.data] == ["model"], models
    entry = models.data[0]
    return entry.id, int(entry.max_model_len)  # type: ignore[attr-defined]


def token_ids(choice: Any) -> list[int]:
    ids = choice.token_ids  # vLLM's field: always there, tokenizer or not
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids), choice
    return ids


def check_completion(
    base_url: str, model: str, prompt: list[int], *, max_tokens: int = 4, api_key: str | None = None
) -> list[int]:
    """A token-id prompt, not streamed: one choice, its token ids, usage that adds up."""
    result = client(base_url, api_key).completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0
    )
    assert result.object == "text_completion" and result.model == model
    assert len(result.choices) == 1 and result.choices[0].index == 0
    choice = result.choices[0]
    ids = token_ids(choice)
    assert choice.finish_reason in ("stop", "length"), choice
    assert 1 <= len(ids) <= max_tokens
    if choice.finish_reason == "length":
        assert len(ids) == max_tokens
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(prompt)
    assert result.usage.completion_tokens == len(ids)
    assert result.usage.total_tokens == len(prompt) + len(ids)
    return ids


def check_stream(
    base_url: str, model: str, prompt: list[int], *, max_tokens: int = 4, api_key: str | None = None
) -> list[int]:
    """Streamed with usage: the chunks' token ids are the unstreamed answer's, one chunk ends
    the choice, the last chunk has no choices and the usage."""
    expected = check_completion(base_url, model, prompt, max_tokens=max_tokens, api_key=api_key)
    stream = client(base_url, api_key).completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *token_chunks, last = chunks
    streamed = [t for chunk in token_chunks for t in token_ids(chunk.choices[0])]
    assert streamed == expected
    finished = [c.choices[0].finish_reason for c in token_chunks if c.choices[0].finish_reason]
    assert len(finished) == 1 and token_chunks[-1].choices[0].finish_reason == finished[0]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(expected)
    assert last.usage.prompt_tokens == len(prompt)
    assert len({c.id for c in chunks}) == 1
    return streamed


def check_batch(
    base_url: str,
    model: str,
    prompts: list[list[int]],
    *,
    max_tokens: int = 3,
    api_key: str | None = None,
) -> None:
    """A list of prompts: one choice per prompt, by index, each what the prompt gets alone."""
    result = client(base_url, api_key).completions.create(
        model=model, prompt=prompts, max_tokens=max_tokens, temperature=0
    )
    assert sorted(c.index for c in result.choices) == list(range(len(prompts)))
    for choice in result.choices:
        alone = check_completion(
            base_url, model, prompts[choice.index], max_tokens=max_tokens, api_key=api_key
        )
        assert token_ids(choice) == alone
    assert result.usage is not None
    assert result.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert result.usage.completion_tokens == sum(len(token_ids(c)) for c in result.choices)


def assert_error(status: int, body: dict[str, Any], want: int, param: str | None) -> None:
    assert status == want, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"], body
    assert error["param"] == param, body
    assert "Traceback" not in error["message"]


def check_refusals(
    base_url: str, model: str, *, max_context: int, api_key: str | None = None
) -> None:
    """Bad requests get OpenAI's error shape, the status, and the parameter at fault; a good
    request is served afterwards (the group keeps serving)."""
    good = {"model": model, "prompt": [2, 3], "max_tokens": 2}
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({**good, "max_tokens": -1}, 400, "max_tokens"),
        ({**good, "max_tokens": max_context}, 400, "max_tokens"),
        ({**good, "model": f"{model}-nope"}, 404, "model"),
        ({**good, "prompt": [2] * max_context}, 400, "prompt"),
        ({**good, "prompt": []}, 400, "prompt"),
        ({**good, "prompt": [-1]}, 400, "prompt"),
        ({**good, "temperature": -0.5}, 400, "temperature"),
        ({**good, "top_p": 0}, 400, "top_p"),
        ({**good, "n": 17}, 400, "n"),
        ({**good, "n": 0}, 400, "n"),
        ({**good, "prompt": [[2]] * 40, "n": 2}, 400, "n"),
        ({**good, "logprobs": 21}, 400, "logprobs"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "best_of": 3}, 400, "best_of"),
        ({**good, "suffix": "!"}, 400, "suffix"),
        ({**good, "no_such_field": 1}, 400, "no_such_field"),
        ({"prompt": [2]}, 400, "model"),
    ]
    for body, status, param in cases:
        got, answer = raw(base_url, "/v1/completions", body, api_key=api_key)
        assert_error(got, answer, status, param)
    got, answer = raw(base_url, "/v1/completions", b'{"model": ', api_key=api_key)
    assert_error(got, answer, 400, None)
    assert "JSON" in answer["error"]["message"]
    got, answer = raw(base_url, "/v1/nowhere", good, api_key=api_key)
    assert_error(got, answer, 404, None)
    # The official client maps the statuses to its exception classes.
    sdk = client(base_url, api_key)
    try:
        sdk.completions.create(model=model, prompt=[2], max_tokens=-1)
    except openai.BadRequestError as error:
        assert isinstance(error.body, dict) and error.body["param"] == "max_tokens"
    else:
        raise AssertionError("max_tokens=-1 was accepted")
    try:
        sdk.completions.create(model=f"{model}-nope", prompt=[2], max_tokens=1)
    except openai.NotFoundError as error:
        assert isinstance(error.body, dict) and error.body["code"] == "model_not_found"
    else:
        raise AssertionError("an unknown model was accepted")
    check_completion(base_url, model, [2, 3], max_tokens=2, api_key=api_key)
