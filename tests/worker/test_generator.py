"""The single-process generator on a synthetic SeedMLP: seeds end to end, admission under a full
KV cache, stop conditions, refused requests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moe_contract.shape import ModelShape
from moe_worker.bench.generator import Generator, Request
from moe_worker.ep.sampling import SamplingParams
from moe_worker.models.weights import SyntheticWeights

SOURCE = SyntheticWeights.for_shape(
    ModelShape(layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, vocab_size=80),
    seed=11,
    max_context=48,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls on shared cores: one thread is several times faster than contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sampled(i: int, length: int, max_tokens: int = 10) -> Request:
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=max_tokens)
    return Request(f"r{i}", tuple(range(1 + i, 1 + i + length)), params)


def test_sampled_requests_do_not_depend_on_their_batch() -> None:
    requests = [sampled(i, n) for i, n in enumerate((4, 15, 7, 1))]
    together = Generator.from_source(SOURCE, 256, max_step_tokens=6).generate(requests)
    for request in requests:
        alone = Generator.from_source(SOURCE, 64).generate([request])
        assert together[request.request_id].token_ids == alone[request.request_id].token_ids
    assert len({tuple(c.token_ids) for c in together.values()}) == 4


def test_requests_wait_for_room_in_the_kv_cache() -> None:
    generator = Generator.from_source(SOURCE, 32, max_step_tokens=64)  # room for one at a time
    requests = [sampled(i, 10, max_tokens=8) for i in range(3)]  # 18 tokens each, 2 blocks
    for request in requests:
        generator.submit(request)
    tokens: dict[object, list[int]] = {}
    finished: list[object] = []
    while not generator.idle:
        assert len(generator.running) <= 1
        for event in generator.step():
            tokens.setdefault(event.request_id, []).append(event.token_id)
            if event.finish_reason:
                finished.append(event.request_id)
    assert finished == ["r0", "r1", "r2"]  # first come, first served
    for request in requests:
        alone = Generator.from_source(SOURCE, 64).generate([request])[request.request_id]
        assert tokens[request.request_id] == alone.token_ids
    assert generator.cache.free_tokens == generator.cache.capacity_tokens


def test_stop_conditions() -> None:
    greedy = SamplingParams(temperature=0, max_tokens=5)
    first = Generator.from_source(SOURCE, 64).generate([Request("a", (3, 4, 5), greedy)])["a"]
    assert first.finish_reason == "length" and len(first.token_ids) == 5
    stop = SamplingParams(temperature=0, max_tokens=5, stop_token_ids=(first.token_ids[2],))
    stopped = Generator.from_source(SOURCE, 64).generate([Request("a", (3, 4, 5), stop)])["a"]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first.token_ids[: first.token_ids.index(first.token_ids[2]) + 1]
    eos_source = SyntheticWeights(SOURCE.spec.replace(eos_token_ids=(first.token_ids[0],)), 11)
    eos = Generator.from_source(eos_source, 64).generate([Request("a", (3, 4, 5), greedy)])["a"]
    assert (eos.token_ids, eos.finish_reason) == (first.token_ids[:1], "stop")
    long = SamplingParams(temperature=0, max_tokens=100)
    full = Generator.from_source(SOURCE, 128).generate([Request("a", tuple(range(40)), long)])["a"]
    assert (len(full.token_ids), full.finish_reason) == (48 - 40, "length")


def test_impossible_requests_are_refused_at_submit() -> None:
    generator = Generator.from_source(SOURCE, 32)
    with pytest.raises(ValueError, match="empty prompt"):
        generator.submit(Request("a", ()))
    with pytest.raises(ValueError, match="leaves no room in the context of 48"):
        generator.submit(Request("a", tuple(range(48))))
    with pytest.raises(ValueError, match="more than the whole cache"):
        generator.submit(Request("a", tuple(range(30)), SamplingParams(max_tokens=10)))
    generator.submit(Request("a", (1, 2)))
    with pytest.raises(ValueError, match="already being served"):
        generator.submit(Request("a", (1, 2)))
