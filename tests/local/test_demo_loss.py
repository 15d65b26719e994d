"""The demo's rank-loss summary from its clients' answers (pure): the pause is the longest gap
between answers around the kill, every answer after it counts, changed answers are caught."""

from __future__ import annotations

from moe_local.demo_loss import LossFigures, _figures
from moe_local.load import Completion


def done(
    index: int, started: float, ended: float, tokens: tuple[int, ...] = (1, 2), status: int = 200
) -> Completion:
    return Completion(index, started, ended, status, tokens, "length" if status == 200 else "")


def test_the_pause_failures_and_changed_answers_around_a_kill() -> None:
    killed = 100.0
    answers = [
        done(0, 98.0, 99.0),
        done(1, 98.5, 99.9),
        done(0, 99.5, 100.1),  # its last token was on the way: ends right after the kill
        done(1, 99.9, 102.4),  # stalled until the survivors regrouped
        done(2, 99.9, 102.5, status=500),
        done(0, 102.4, 103.0, tokens=(1, 3)),  # an answer that changed
    ]
    figures = _figures("demo-8", answers, killed, 0, 30.0, 3)
    assert isinstance(figures, LossFigures)
    assert round(figures.resumed_s or 0, 2) == 2.4  # 100.1 -> 102.4 is the longest gap
    assert (figures.failed, figures.answered, figures.changed) == (1, 4, 1)
    lines = "\n".join(figures.lines())
    assert "kill -9 of demo-8" in lines and "2.4s after" in lines and "epoch 3" in lines
