"""Generated tokens to text, incrementally, with stop strings.

Decoding token by token would split multi-byte characters and lose the spaces tokenizers attach
to neighbouring tokens, so every push decodes the whole completion and emits what is new. Text is
held back while it ends in an incomplete UTF-8 sequence (U+FFFD), and, when stop strings are set,
by one character less than the longest of them: text already sent can then never turn out to be
the start of a stop string. Completions are at most the model's context long, so decoding them
whole each time stays cheap next to a forward step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """One choice's text. `push` takes its new tokens and returns the text to send for them."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = tuple(stops)
        self.holdback = max((len(stop) for stop in self.stops), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        """What has been sent so far."""
        self.stopped = False
        """A stop string appeared: the choice is over, the text ends before it."""
        self._searched = 0  # stop strings cannot start before this index of the decoded text

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Text newly visible after `token_ids`; `final`: no more tokens will come."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        decoded = self.decode(self.token_ids)
        end = self._stop_at(decoded)
        if end is not None:
            self.stopped = True
            visible = decoded[:end]
        elif final:
            visible = decoded
        else:
            visible = decoded[: len(decoded) - self.holdback].rstrip(REPLACEMENT)
        # Should decoding rewrite text already sent (rare), only what lies beyond it is sent.
        new = visible[len(self.text) :]
        self.text += new
        return new

    def _stop_at(self, decoded: str) -> int | None:
        if not self.stops:
            return None
        start = self._searched
        found = [i for i in (decoded.find(stop, start) for stop in self.stops) if i >= 0]
        # A stop string not complete yet may start within the last `holdback` characters.
        self._searched = max(0, len(decoded) - self.holdback)
        return min(found) if found else None
