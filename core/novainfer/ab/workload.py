"""The fixed workload of a sweep, drawn exactly as nano-vllm's bench.py draws it, and the correctness gate's inputs.

nano-vllm's bench.py does, with the module-level `random` functions:

    seed(0)
    prompt_token_ids = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    sampling_params = [SamplingParams(ignore_eos=True, max_tokens=randint(100, max_output_len)) for _ in ...]

`Workload` repeats those draws, in that order, from a `random.Random(seed)` of its own (whose draws equal the
module-level ones after `random.seed(seed)`, without disturbing the global generator), so a NovaInfer number and
a nano-vllm number at the same caliber measure requests of the same lengths. EOS is always ignored: every request
produces exactly its drawn output length, which is what makes the token count a checkable caliber.

The lengths are the caliber and stay the same for every arm. The timed run's token ids are drawn anew in each
trial, after its engine has started, from a seed the trial records (`prompts(token_seed)`): a backend cannot
compute the workload during start-up and replay it inside the timed window, and the check of the run's outputs
rebuilds the same prompts from the recorded seed. bench.py's own ids (`prompts()`) serve the untimed warm-up.

With a length mix (`lengths`, novainfer.ab.lengths: vLLM's random, a ShareGPT-like log-normal, shared prefixes)
the mix draws the lengths from the seed instead, and `input_len` / `output_len` are the mix's bounds; in a
shared-prefix mix every request of a group starts with the same ids (drawn first, one prefix per group).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

from novainfer.ab.lengths import LengthMix

# bench.py draws token ids with randint(0, 10000), both ends included: the model's vocabulary must exceed it.
MAX_TOKEN_ID = 10000


@dataclass(frozen=True)
class Workload:
    """A fixed-caliber workload: `num_seqs` requests with lengths drawn from inclusive [lo, hi] ranges.

    The dataclass holds only the recipe (it travels to each trial process as JSON; `Workload(**asdict(w))`
    rebuilds it); the token ids are drawn on first use and are the same on every machine and Python 3 version.
    """

    num_seqs: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 0
    lengths: LengthMix | None = None  # None: bench.py's uniform draws from input_len and output_len

    def __post_init__(self) -> None:
        # A JSON round trip turns the ranges into lists; keep them tuples so equal workloads compare equal.
        object.__setattr__(self, "input_len", tuple(self.input_len))
        object.__setattr__(self, "output_len", tuple(self.output_len))
        if isinstance(self.lengths, dict):
            object.__setattr__(self, "lengths", LengthMix(**self.lengths))

    def recipe(self) -> dict[str, Any]:
        """What fixes the workload, as plain data (the sweep's identity, the MLflow dataset): the mix only when
        there is one, so a uniform workload keeps the recipe it had before mixes existed."""
        recipe: dict[str, Any] = {
            "num_seqs": self.num_seqs, "input_len": list(self.input_len), "output_len": list(self.output_len),
            "seed": self.seed,
        }
        if self.lengths is not None:
            recipe["lengths"] = self.lengths.to_dict()
        return recipe

    @cached_property
    def _drawn(self) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        if self.lengths is not None:
            prompt_lens, output_lens = self.lengths.draw(self.num_seqs, self.seed)
            return _token_ids(self.lengths, random.Random(self.seed), prompt_lens), tuple(output_lens)
        rng = random.Random(self.seed)
        in_lo, in_hi = self.input_len
        out_lo, out_hi = self.output_len
        # All prompts first, then all output lengths: bench.py's order, so the streams line up draw for draw.
        prompts = tuple(
            tuple(rng.randint(0, MAX_TOKEN_ID) for _ in range(rng.randint(in_lo, in_hi))) for _ in range(self.num_seqs)
        )
        output_lens = tuple(rng.randint(out_lo, out_hi) for _ in range(self.num_seqs))
        return prompts, output_lens

    def prompts(self, token_seed: int | None = None) -> list[list[int]]:
        """The prompts' token ids (fresh lists, so callers may keep or change them): bench.py's, or with a
        `token_seed` ids drawn from it, in [0, MAX_TOKEN_ID], for prompts of the same lengths."""
        if token_seed is None:
            return [list(p) for p in self._drawn[0]]
        rng = random.Random(token_seed)
        if self.lengths is not None:
            return [list(p) for p in _token_ids(self.lengths, rng, [len(p) for p in self._drawn[0]])]
        return [[rng.randint(0, MAX_TOKEN_ID) for _ in p] for p in self._drawn[0]]

    def output_lens(self) -> list[int]:
        """Each request's output length (its max_tokens; EOS is ignored, so also its exact output)."""
        return list(self._drawn[1])

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self._drawn[0])

    @property
    def expected_output_tokens(self) -> int:
        """The output tokens a correct run of the whole workload produces: the caliber check's target."""
        return sum(self._drawn[1])


def _token_ids(mix: LengthMix, rng: random.Random, prompt_lens: list[int]) -> tuple[tuple[int, ...], ...]:
    """Token ids of a mix's prompts: each group's shared prefix first, then every prompt's own ids."""
    groups = mix.num_groups if mix.mix == "shared_prefix" else 0
    prefixes = [tuple(rng.randint(0, MAX_TOKEN_ID) for _ in range(mix.prefix_len)) for _ in range(groups)]
    prompts = []
    for i, n in enumerate(prompt_lens):
        group = mix.group(i)
        prefix = prefixes[group] if group is not None else ()
        prompts.append(prefix + tuple(rng.randint(0, MAX_TOKEN_ID) for _ in range(n - len(prefix))))
    return tuple(prompts)


class TeacherForcingInputs(NamedTuple):
    prompts: list[list[int]]
    continuations: list[list[int]]


def teacher_forcing_inputs(
    seed: int, num_seqs: int, prompt_len: int, decode_steps: int, vocab_size: int
) -> TeacherForcingInputs:
    """Deterministic prompts and forced continuations for the correctness gate.

    Prompt lengths vary in [ceil(prompt_len / 2), prompt_len] so the gate sees a ragged batch (a backend that
    mishandles per-sequence offsets fails it), and every continuation has exactly `decode_steps` tokens. Ids
    cover the whole vocabulary [0, vocab_size).
    """
    rng = random.Random(seed)
    shortest = max(1, -(-prompt_len // 2))
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(shortest, prompt_len))] for _ in range(num_seqs)]
    continuations = [[rng.randrange(vocab_size) for _ in range(decode_steps)] for _ in range(num_seqs)]
    return TeacherForcingInputs(prompts, continuations)
