"""A tokenizer with special tokens and a chat template, saved by transformers the way a
checkpoint ships them (tokenizer.json, tokenizer_config.json, chat_template.jinja): what the chat
API and its parity with transformers' `apply_chat_template` are tested on."""

from __future__ import annotations

from pathlib import Path

UNK, EOS, BOS = 0, 1, 2
WORDS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on a mat",
    "system user assistant : hello you are kind",
]
TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ message['role'] }} : {{ message['content'] | trim }} {{ eos_token }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def save_chat_tokenizer(directory: Path, template: str | None = TEMPLATE) -> Path:
    """A WordLevel tokenizer ([UNK] 0, </s> 1, <s> 2, then the words), adding <s> before a
    text, with `template` as its chat template; saved into `directory`, which it returns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>", "<s>"])
    tokenizer.train_from_iterator(WORDS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(directory)
    return directory


def save_chat_mixtral(directory: Path) -> Path:
    """A tiny random Mixtral (transformers' classes, save_pretrained) with the chat tokenizer
    beside it: a checkpoint as the hub ships one, EOS </s>, BOS <s>."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    save_chat_tokenizer(directory)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        initializer_range=0.15,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=UNK,
    )
    MixtralForCausalLM(config).eval().save_pretrained(directory)
    return directory
