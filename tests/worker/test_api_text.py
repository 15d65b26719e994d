"""Incremental detokenization and stop strings (pure: a byte-level toy decoder, no server)."""

from __future__ import annotations

import pytest

from moe_worker.api.text import TextStream

# A byte-level vocabulary: token i is the i-th byte string, so a character can span tokens.
PIECES = [b"he", b"llo", b" w", b"or", b"ld", b"\xc3", b"\xa9", b"!", b" ", b"STOP"]


def decode(ids: list[int]) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def pushes(stream: TextStream, ids: list[int]) -> list[str]:
    out = [stream.push([i], final=n == len(ids) - 1) for n, i in enumerate(ids)]
    return out


def test_text_adds_up_to_the_whole_decode() -> None:
    ids = [0, 1, 2, 3, 4, 7]
    assert "".join(pushes(TextStream(decode), ids)) == decode(ids) == "hello world!"


def test_a_character_split_across_tokens_is_held_until_complete() -> None:
    stream = TextStream(decode)
    assert stream.push([0]) == "he"
    assert stream.push([5]) == ""  # half of "é"
    assert stream.push([6]) == "é"
    assert stream.push([7], final=True) == "!"


@pytest.mark.parametrize(
    ("stops", "text"),
    [
        (["world"], "hello "),
        (["lo w"], "hel"),
        (["o"], "hell"),
        (["xyz", "or"], "hello w"),
        (["!"], "hello world"),
        (["absent"], "hello world!"),
    ],
)
def test_stop_strings_end_the_text_before_them(stops: list[str], text: str) -> None:
    stream = TextStream(decode, stops)
    sent = "".join(pushes(stream, [0, 1, 2, 3, 4, 7]))
    assert sent == text == stream.text
    assert stream.stopped == (stops != ["absent"])


def test_nothing_sent_can_become_part_of_a_stop_string() -> None:
    stream = TextStream(decode, ["world"])
    parts = [stream.push([0]), stream.push([1]), stream.push([2]), stream.push([3])]
    # "hello wor" could still become "hello world": the last 4 characters wait.
    assert "".join(parts) == "hello"
    assert stream.push([4]) == " " and stream.stopped
    assert stream.push([7], final=True) == ""  # after the stop, nothing more


def test_a_stop_string_in_the_first_token() -> None:
    stream = TextStream(decode, ["STOP"])
    assert stream.push([9]) == "" and stream.stopped and stream.token_ids == [9]
