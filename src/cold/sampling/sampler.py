"""The per-sequence decoding settings of a batch as tensors, built once when sequences join or leave.

    sampler = Sampler.build([r.params for r in requests], device)   # at join
    tokens = sampler.pick(score)                                     # every step: [S, V] -> [S]
    sampler = sampler.merged(other) / sampler.kept([0, 2])           # when the batch changes

`contrastive` / `alpha` / `beta` / `forms` / `schedules` are what `cold.runner` needs to score the CoLD
sequences; picking is greedy for every sequence, then one batched top-k / top-p warp and a draw
from each sampling sequence's own seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cold.params import DecodeParams
from cold.sampling import scoring


def new_generator(seed: int | None, device) -> torch.Generator:
    """A generator seeded with `seed` (None: a random seed)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class Sampler:
    """Settings of sequences 0..S-1 of a batch, in batch order."""

    def __init__(self, params: Sequence[DecodeParams], generators: Sequence[torch.Generator | None], device):
        self.params, self.generators, self.device = list(params), list(generators), device
        tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        contrastive = [i for i, p in enumerate(self.params) if p.contrastive]
        self.every_contrastive = bool(contrastive) and len(contrastive) == len(self.params)
        self.contrastive = tensor(contrastive, torch.long) if contrastive else None  # [C] sequence indices
        self.contrastive_seqs = contrastive  # the same, as a list
        chosen = [self.params[i] for i in contrastive]
        self.alpha = tensor([p.alpha for p in chosen], torch.float32)  # [C]
        self.beta = tensor([p.beta for p in chosen], torch.float32)  # [C]
        self.forms = [p.scoring for p in chosen]
        self.schedules = [p.beta_schedule for p in chosen]
        self.sampling = [i for i, p in enumerate(self.params) if p.do_sample]  # sequences that sample
        drawn = [self.params[i] for i in self.sampling]
        self._rows = tensor(self.sampling, torch.long)
        self._temperature = tensor([p.temperature for p in drawn], torch.float32)
        self._top_k = tensor([p.top_k for p in drawn], torch.long)
        self._top_p = tensor([p.top_p for p in drawn], torch.float32)

    @classmethod
    def build(cls, params: Sequence[DecodeParams], device) -> "Sampler":
        """Settings of newly joining sequences, each sampling one with a generator from its seed."""
        return cls(params, [new_generator(p.seed, device) if p.do_sample else None for p in params], device)

    def __len__(self) -> int:
        return len(self.params)

    def merged(self, other: "Sampler") -> "Sampler":
        """This batch's sequences followed by `other`'s (generators carried over, not reseeded)."""
        return Sampler(self.params + other.params, self.generators + other.generators, self.device)

    def kept(self, seqs: Sequence[int]) -> "Sampler":
        """Only sequences `seqs`, renumbered 0.. in that order."""
        return Sampler([self.params[s] for s in seqs], [self.generators[s] for s in seqs], self.device)

    def repeated(self, times: int) -> "Sampler":
        """Every sequence `times` times in a row (beam search: one entry per beam)."""
        return Sampler([p for p in self.params for _ in range(times)], [g for g in self.generators for _ in range(times)], self.device)

    def pick(self, score: torch.Tensor) -> torch.Tensor:
        """[S] next token of every sequence from its score [S, V]: argmax, or a draw from its own generator."""
        tokens = scoring.pick_greedy(score)
        if self.sampling:
            probs = scoring.sample_probs(score[self._rows], self._temperature, self._top_k, self._top_p)  # [Sm, V]
            for j, seq in enumerate(self.sampling):
                tokens[seq] = torch.multinomial(probs[j : j + 1], num_samples=1, generator=self.generators[seq])[0, 0]
        return tokens
