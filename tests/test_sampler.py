from __future__ import annotations

import torch

from novainfer.sampler import sample
from novainfer.sequence import SamplingParams


def logits(rows: int = 3, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))


def test_greedy_is_argmax() -> None:
    x = logits()
    assert sample(x, [SamplingParams()] * 3, [None] * 3).tolist() == x.argmax(-1).tolist()


def test_seeded_requests_repeat_whatever_shares_the_batch() -> None:
    x = logits(vocab=1000)
    p = SamplingParams(temperature=1.0, seed=5)

    def draw(others: int) -> list[int]:
        """Two consecutive draws of the seeded request, beside `others` unseeded ones."""
        gen = torch.Generator().manual_seed(5)
        batch = torch.cat([x[:1], logits(others, 1000)])
        params = [p] + [SamplingParams(temperature=1.0)] * others
        return [sample(batch, params, [gen] + [None] * others)[0].item() for _ in range(2)]

    assert draw(0) == draw(3)
    assert len({tuple(draw(0)) for _ in range(3)}) == 1


def test_top_k_keeps_only_the_k_best() -> None:
    x = logits(rows=1, vocab=100)
    best = set(x[0].topk(3).indices.tolist())
    seen = {
        sample(x, [SamplingParams(temperature=5.0, top_k=3)], [torch.Generator().manual_seed(i)]).item()
        for i in range(200)
    }
    assert seen <= best and len(seen) > 1


def test_top_p_keeps_the_nucleus() -> None:
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = [SamplingParams(temperature=1.0, top_p=0.7)]
    seen = {sample(x, params, [torch.Generator().manual_seed(i)]).item() for i in range(300)}
    assert seen == {0, 1}, "0.5 + 0.3 reaches 0.7, so only the first two tokens may be drawn"
    seen_tiny = {sample(x, [SamplingParams(temperature=1.0, top_p=0.01)], [None]).item() for _ in range(50)}
    assert seen_tiny == {0}
