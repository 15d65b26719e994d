"""Sampling: per-request seeds, independence from the batch, top-k / top-p, stop conditions."""

from __future__ import annotations

import pytest
import torch

from moe_worker.ep.sampling import SamplingParams, filter_logits, finish_reason, sample

VOCAB = 50


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def test_a_seed_reproduces_its_tokens() -> None:
    params = [SamplingParams(temperature=0.9, top_p=0.95)] * 4
    first = sample(logits(4), params, [7, 7, 8, 8], [0, 1, 0, 1])
    again = sample(logits(4), params, [7, 7, 8, 8], [0, 1, 0, 1])
    assert torch.equal(first, again)
    draws = {tuple(sample(logits(4), params, [s] * 4, [0] * 4).tolist()) for s in range(20)}
    assert len(draws) > 1  # seeds matter


def test_a_rows_token_does_not_depend_on_the_rest_of_the_batch() -> None:
    row = logits(1, seed=3)
    mine = SamplingParams(temperature=1.3, top_k=20, top_p=0.9)
    alone = sample(row, [mine], [42], [5])
    others = logits(4, seed=4)
    batch = torch.cat([others[:2], row, others[2:]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_p=0.5), mine]
    params += [SamplingParams(top_k=3), SamplingParams(temperature=2.0)]
    together = sample(batch, params, [1, 2, 42, 3, 4], [0, 9, 5, 2, 1])
    assert together[2] == alone[0]
    assert together[0] == others[0].argmax()


def test_top_k_one_and_temperature_zero_are_greedy() -> None:
    rows = logits(6, seed=5)
    greedy = rows.argmax(-1)
    for seed in range(10):
        top1 = sample(rows, [SamplingParams(temperature=1.5, top_k=1)] * 6, [seed] * 6, [0] * 6)
        zero = sample(rows, [SamplingParams(temperature=0)] * 6, [seed] * 6, [0] * 6)
        assert torch.equal(top1, greedy) and torch.equal(zero, greedy)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p: float) -> None:
    rows = logits(8, seed=6)
    kept = filter_logits(rows, torch.zeros(8, dtype=torch.int64), torch.full((8,), top_p))
    probs = torch.softmax(rows, -1)
    for b in range(8):
        keep = torch.isfinite(kept[b])
        mass = probs[b][keep].sum()
        smallest_kept = probs[b][keep].min()
        assert mass >= top_p - 1e-6  # reaches the mass...
        assert mass - smallest_kept < top_p  # ...and no token could be dropped
        dropped = probs[b][~keep]
        assert dropped.numel() == 0 or dropped.max() <= smallest_kept  # the most likely ones
        torch.testing.assert_close(kept[b][keep], rows[b][keep])  # kept logits untouched
    params = [SamplingParams(top_p=top_p)] * 8
    for seed in range(30):
        tokens = sample(rows, params, [seed] * 8, [0] * 8)
        assert torch.isfinite(kept[torch.arange(8), tokens]).all()


def test_top_k_keeps_k_tokens_then_top_p_applies_to_what_is_left() -> None:
    rows = logits(3, seed=8)
    kept = filter_logits(rows, torch.tensor([5, 5, 0]), torch.tensor([1.0, 0.5, 1.0]))
    assert torch.isfinite(kept[0]).sum() == 5
    assert set(kept[0].isfinite().nonzero().flatten().tolist()) == set(
        rows[0].topk(5).indices.tolist()
    )
    top5 = torch.softmax(rows[1].topk(5).values, -1)
    needed = int((top5.cumsum(0) < 0.5).sum()) + 1
    assert torch.isfinite(kept[1]).sum() == needed
    assert torch.isfinite(kept[2]).all()


def test_samples_follow_the_distribution() -> None:
    row = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    rows = row.expand(4000, 4)  # one request per seed, all in one batch
    draws = sample(rows, [SamplingParams()] * 4000, list(range(4000)), [0] * 4000)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_finish_reasons() -> None:
    params = SamplingParams(max_tokens=3, stop_token_ids=(9,))
    assert finish_reason(4, 1, params, (2,), 10, 100) is None
    assert finish_reason(2, 1, params, (2,), 10, 100) == "stop"
    assert finish_reason(9, 1, params, (2,), 10, 100) == "stop"
    assert finish_reason(4, 3, params, (2,), 10, 100) == "length"
    assert finish_reason(4, 1, params, (2,), 100, 100) == "length"
    ignoring = SamplingParams(max_tokens=3, ignore_eos=True)
    assert finish_reason(2, 1, ignoring, (2,), 10, 100) is None


def test_invalid_parameters_are_refused() -> None:
    for bad in (
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"max_tokens": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
