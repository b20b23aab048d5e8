"""Length mixes beyond bench.py's uniform ranges: `[workload.lengths]`, drawn from the workload's seed, no download.

Three mixes, each a recipe whose draws are the same on every machine (Python's own `random`, seeded):

- "random": vLLM `bench serve`'s random dataset. A length of centre L and range ratio r is drawn uniformly
  from the integers [max(1, floor(L (1 - r))), ceil(L (1 + r))], r in [0, 1) (vLLM's convention: r is the
  half-width as a fraction of L; SGLang's `--random-range-ratio` means something else, the low end as a
  fraction of L). All prompt lengths are drawn first, then all output lengths.
- "sharegpt": a log-normal clipped to [lo, hi], standing in for the ShareGPT conversations that vLLM's
  paper serves (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
  PagedAttention", SOSP 2023: ShareGPT prompts average 161.31 tokens and outputs 337.99). The means are
  those of the unclipped distribution (mu = ln(mean) - sigma^2 / 2); sigma, the spread of log length, is
  ours (default 1.0: a coefficient of variation of 1.31, ShareGPT's long tail); the paper gives none.
  Clipping follows vLLM's ShareGPT sampler, which drops prompts or outputs under 4 tokens and prompts over
  1024: default bounds [4, 1024] for both.
- "shared_prefix": SGLang's generated-shared-prefix family: num_groups system prompts of prefix_len tokens,
  each followed by questions whose lengths are drawn as "random" draws them (centre input_len, ratio
  range_ratio); output lengths likewise. Request i belongs to group i % num_groups, so every group is
  spread over the whole arrival schedule, as SGLang's shuffle spreads them.

The mix fixes lengths only; the prompts' token ids are drawn by novainfer.ab.workload (the prefix of a group
is the same ids in every request of that group).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

MIXES = ("random", "sharegpt", "shared_prefix")
# Published ShareGPT means (vLLM's paper, see the module docstring), rounded to whole tokens.
SHAREGPT_INPUT_MEAN = 161
SHAREGPT_OUTPUT_MEAN = 338
SHAREGPT_CLIP = (4, 1024)


@dataclass(frozen=True)
class LengthMix:
    """One `[workload.lengths]` table, resolved (defaults filled in). Which fields a mix reads:

    random: input_len, output_len (centres), range_ratio.
    sharegpt: input_len, output_len (means of the unclipped log-normal), sigma, input_clip, output_clip.
    shared_prefix: num_groups, prefix_len, input_len (the question's centre), output_len, range_ratio.
    """

    mix: Literal["random", "sharegpt", "shared_prefix"]
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    sigma: float = 1.0
    input_clip: tuple[int, int] = SHAREGPT_CLIP
    output_clip: tuple[int, int] = SHAREGPT_CLIP
    num_groups: int = 1
    prefix_len: int = 0

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep them tuples so equal mixes compare equal.
        object.__setattr__(self, "input_clip", tuple(self.input_clip))
        object.__setattr__(self, "output_clip", tuple(self.output_clip))

    def to_dict(self) -> dict[str, Any]:
        """Only the fields this mix reads (what the experiment's identity and the MLflow dataset record)."""
        used = {
            "random": ("input_len", "output_len", "range_ratio"),
            "sharegpt": ("input_len", "output_len", "sigma", "input_clip", "output_clip"),
            "shared_prefix": ("num_groups", "prefix_len", "input_len", "output_len", "range_ratio"),
        }[self.mix]
        data = asdict(self)
        return {"mix": self.mix, **{key: list(data[key]) if key.endswith("_clip") else data[key] for key in used}}

    def bounds(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The least and greatest prompt and output lengths this mix can draw (what the file checks hold
        the model's length and the KV cache against)."""
        if self.mix == "sharegpt":
            return self.input_clip, self.output_clip
        prompt = ratio_range(self.input_len, self.range_ratio)
        if self.mix == "shared_prefix":
            prompt = (prompt[0] + self.prefix_len, prompt[1] + self.prefix_len)
        return prompt, ratio_range(self.output_len, self.range_ratio)

    def draw(self, num_seqs: int, seed: int) -> tuple[list[int], list[int]]:
        """Every request's prompt and output length, from `seed`."""
        rng = random.Random(seed)
        if self.mix == "sharegpt":
            prompts = [_clipped_lognormal(rng, self.input_len, self.sigma, self.input_clip) for _ in range(num_seqs)]
            outputs = [_clipped_lognormal(rng, self.output_len, self.sigma, self.output_clip) for _ in range(num_seqs)]
            return prompts, outputs
        prompts = [rng.randint(*ratio_range(self.input_len, self.range_ratio)) for _ in range(num_seqs)]
        outputs = [rng.randint(*ratio_range(self.output_len, self.range_ratio)) for _ in range(num_seqs)]
        return [n + self.prefix_len for n in prompts], outputs

    def group(self, request: int) -> int | None:
        """The shared-prefix group of a request (None for mixes without one)."""
        return request % self.num_groups if self.mix == "shared_prefix" else None


def ratio_range(centre: int, ratio: float) -> tuple[int, int]:
    """vLLM's random range: [max(1, floor(centre (1 - ratio))), ceil(centre (1 + ratio))]."""
    return max(1, math.floor(centre * (1 - ratio))), math.ceil(centre * (1 + ratio))


def _clipped_lognormal(rng: random.Random, mean: float, sigma: float, clip: tuple[int, int]) -> int:
    mu = math.log(mean) - sigma * sigma / 2  # the unclipped distribution's mean is `mean`
    return min(max(round(rng.lognormvariate(mu, sigma)), clip[0]), clip[1])
