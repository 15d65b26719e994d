"""The chat template as transformers renders it: found where a checkpoint ships it, rendered and
tokenized to the ids `apply_chat_template` gives, refusals and broken templates named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_fixtures import TEMPLATE, save_chat_tokenizer

from moe_contract.shape import ModelShape
from moe_worker.api.chat_template import TemplateRefused, load_chat_template
from moe_worker.api.errors import ApiError
from moe_worker.serving.generation import ModelCard

CONVERSATIONS = [
    [{"role": "user", "content": "hello the cat"}],
    [
        {"role": "system", "content": "you are kind "},
        {"role": "user", "content": "the dog sat"},
        {"role": "assistant", "content": "on the log"},
        {"role": "user", "content": "a cat ?"},
    ],
]


def card(directory: Path, override: Path | None = None) -> ModelCard:
    return ModelCard(
        "m",
        ModelShape(vocab_size=64),
        64,
        tokenizer_path=str(directory / "tokenizer.json"),
        chat_template_path=None if override is None else str(override),
    )


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendered_and_tokenized_as_transformers_does(
    tmp_path: Path, generation_prompt: bool
) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    directory = save_chat_tokenizer(tmp_path)
    reference = AutoTokenizer.from_pretrained(directory)
    template = load_chat_template(card(directory))
    assert template is not None and template.origin == "chat_template.jinja"
    assert (template.bos_token, template.eos_token) == ("<s>", "</s>")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    for messages in CONVERSATIONS:
        text = template.render(messages, add_generation_prompt=generation_prompt)
        assert text == reference.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        expected = reference.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )
        assert ids == list(expected) and ids[0] == 2  # one <s>: the template's, none added


def test_found_in_tokenizer_config_single_or_named(tmp_path: Path) -> None:
    directory = save_chat_tokenizer(tmp_path, template=None)
    assert load_chat_template(card(directory)) is None
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": "A{{ messages | length }}"}))
    template = load_chat_template(card(directory))
    assert template is not None and template.render(CONVERSATIONS[1]) == "A4"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config_path.write_text(json.dumps({**config, "chat_template": named}))
    template = load_chat_template(card(directory))
    assert template is not None and template.render([]) == "D"
    override = tmp_path / "mine.jinja"
    override.write_text("{{ bos_token }}{{ messages[0]['content'] | tojson }}")
    template = load_chat_template(card(directory, override))
    assert template is not None and template.origin == str(override)
    assert template.render([{"role": "user", "content": "é"}]) == '<s>"é"'


def test_refusals_and_broken_templates_are_named(tmp_path: Path) -> None:
    directory = save_chat_tokenizer(tmp_path)
    template = load_chat_template(card(directory))
    assert template is not None and TEMPLATE in template.source
    with pytest.raises(TemplateRefused, match="not tool"):
        template.render([{"role": "tool", "content": "x"}])
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ messages[0].__class__.__mro__ }}")  # the sandbox says no
    bad = load_chat_template(card(directory, broken))
    assert bad is not None
    with pytest.raises(ApiError, match=r"broken\.jinja"):
        bad.render([{"role": "user", "content": "x"}])
    with pytest.raises(ApiError, match="cannot be read"):
        load_chat_template(card(directory, tmp_path / "missing.jinja"))


def test_a_missing_chat_template_file_stops_the_worker_at_start(tmp_path: Path) -> None:
    from moe_worker.process import EXIT_CONFIG, serve
    from moe_worker.settings import WorkerSettings

    message = tmp_path / "termination-log"
    message.write_text("")
    settings = WorkerSettings(
        chat_template=str(tmp_path / "absent.jinja"), termination_message_path=str(message)
    )
    assert serve(settings) == EXIT_CONFIG
    assert "--chat-template" in message.read_text() and "absent.jinja" in message.read_text()
