"""Next-token choice: greedy, or temperature / top-k / top-p, with optional per-request seeds."""

from __future__ import annotations

import torch

from novainfer.sequence import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Token ids [S] for logits [S, vocab] (float32), one row per request.

    A request with a generator (it asked for a seed) draws only from it, so its tokens do not
    depend on what else shares the batch.
    """
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled_rows:
        return greedy
    rows = torch.tensor(sampled_rows, device=logits.device)
    sub = [params[i] for i in sampled_rows]
    temperature = torch.tensor([p.temperature for p in sub], device=logits.device).unsqueeze(1)
    probs = _filter_top_k_top_p(logits[rows] / temperature, sub).softmax(dim=-1)
    # Exponential race (argmax of p / q with q ~ Exp(1)) draws from probs, one noise tensor for all rows.
    noise = torch.empty_like(probs).exponential_()
    for j, i in enumerate(sampled_rows):
        if generators[i] is not None:
            noise[j].exponential_(generator=generators[i])
    greedy[rows] = (probs / noise).argmax(dim=-1)
    return greedy


def _filter_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k and top-p nucleus (the best token always stays)."""
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_p, device=logits.device).unsqueeze(1)
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
