"""The lazy amateur's bookkeeping: which CoLD sequences' amateurs run with the expert every step,
which lag behind, the tokens a lagging amateur has not seen yet, and how often each sequence
needed its amateur. Engine-agnostic: sequences are indices 0..S-1 of a batch, tokens are ids.

Why it is exact: CoLD's score is -inf outside the expert's plausibility mask, so when the mask
holds one token that token is chosen whatever the amateur says (greedy; sampling, where it has
all the probability; beam search, where it adds log 1 = 0). Such a step needs no amateur
logits. An amateur that is not needed may fall behind; when it is needed again, the engine feeds
it its pending tokens as one multi-token chunk (a "catch-up") before scoring.

The policy (`cobatch_steps`, K): after a step that needed the amateur, keep that sequence's
amateur current, fed with the expert in the same forward, for K more steps; a sequence whose
amateur went K steps unneeded lags until it is needed. K = 0 is fully lazy, K = ALWAYS keeps
every amateur current (and prefilled at join) as plain co-batched CoLD does. In between, a
joining amateur is prefilled with its expert while most recent sequences needed their amateur
at some step (`NeedShare`), and left to lag from its prompt otherwise: prefilling alongside the
expert costs less than a separate catch-up pass over the prompt, but nothing for a sequence that
never needs its amateur.

    lag = AmateurLag.start(prompts, contrastive, cobatch_steps)    # at join
    lag.observe(needed)           # after scoring: needed[seq] for every contrastive sequence
    lag.catch_up_seqs(needed)     # lagging sequences that must be caught up before scoring
    lag.caught_up(seqs)           # their pending tokens were fed
    lag.fed(tokens)               # after the step: lagging sequences collect the new token
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

ALWAYS = 1 << 30  # cobatch_steps that keeps every amateur current
PREFILL_SHARE = 0.4  # prefill joining amateurs while at least this share of recent sequences needed theirs
SHARE_WEIGHT = 0.1  # weight of each finished sequence in that running share


@dataclass
class NeedShare:
    """A running share (exponentially weighted) of finished CoLD sequences that needed their
    amateur at least once; it starts at 1, so the first sequences are prefilled."""

    value: float = 1.0

    def record(self, needed_steps: Sequence[int]) -> None:
        """Sequences that leave the batch, each with the number of steps that needed its amateur."""
        for n in needed_steps:
            self.value += SHARE_WEIGHT * ((n > 0) - self.value)

    def prefill(self, cobatch_steps: int) -> bool:
        """Whether joining amateurs are prefilled with their experts under policy K = cobatch_steps."""
        return cobatch_steps >= ALWAYS or (cobatch_steps > 0 and self.value >= PREFILL_SHARE)


@dataclass
class AmateurLag:
    """Per sequence of a batch (index = sequence); entries of non-contrastive sequences are unused."""

    cobatch_steps: int
    contrastive: list[bool]
    pending: list[list[int]]  # tokens the amateur has not seen, oldest first (a lagging amateur's)
    cobatched: list[bool]  # the amateur is current and is fed with the expert at the next step
    started: list[bool]  # the amateur has seen at least its prompt (an unstarted one's cache is empty)
    quiet: list[int]  # steps since the amateur was last needed
    needed: list[int] = field(default_factory=list)  # steps that needed the amateur, per sequence
    steps: list[int] = field(default_factory=list)  # scored steps, per sequence

    @classmethod
    def start(cls, prompts: Sequence[Sequence[int]], contrastive: Sequence[bool], cobatch_steps: int,
              prefilled: bool = False) -> "AmateurLag":
        """Joining sequences. Their amateurs were `prefilled` with the experts (always so when
        K = ALWAYS), or lag with the whole prompt pending: one never needed never pays for its prefill."""
        prefilled = prefilled or cobatch_steps >= ALWAYS
        n = len(prompts)
        return cls(
            cobatch_steps=cobatch_steps,
            contrastive=list(contrastive),
            pending=[[] if prefilled or not c else list(p) for p, c in zip(prompts, contrastive)],
            cobatched=[prefilled and c for c in contrastive],
            started=[prefilled or not c for c in contrastive],
            quiet=[0 if prefilled else ALWAYS] * n,
            needed=[0] * n,
            steps=[0] * n,
        )

    def __len__(self) -> int:
        return len(self.contrastive)

    @property
    def lazy(self) -> bool:
        """Whether any amateur may lag (False: every amateur is current at every step)."""
        return self.cobatch_steps < ALWAYS

    def catch_up_seqs(self, needed: dict[int, bool]) -> list[int]:
        """The sequences, among those whose amateur is needed now, that have tokens pending."""
        return [s for s, need in needed.items() if need and self.pending[s]]

    def caught_up(self, seqs: Sequence[int]) -> None:
        for s in seqs:
            self.pending[s] = []
            self.started[s] = True

    def observe(self, needed: dict[int, bool]) -> None:
        """Record one scored step ({sequence: whether its mask left more than one token}) and
        decide, per sequence, whether its amateur runs with the expert at the next step."""
        for s, need in needed.items():
            self.steps[s] += 1
            self.needed[s] += need
            self.quiet[s] = 0 if need else min(self.quiet[s] + 1, ALWAYS)
            current = not self.pending[s] and self.started[s]
            self.cobatched[s] = current and self.quiet[s] < self.cobatch_steps

    def fed(self, tokens: Sequence[int]) -> None:
        """Each sequence's new token (after a step): a lagging amateur adds it to its pending tokens."""
        for s, token in enumerate(tokens):
            if self.contrastive[s] and not self.cobatched[s]:
                self.pending[s].append(token)

    # ---- the batch changes ----------------------------------------------------------------------

    def _pick(self, seqs: Sequence[int]) -> "AmateurLag":
        out = AmateurLag(self.cobatch_steps, *([getattr(self, name)[s] for s in seqs] for name in _PER_SEQUENCE))
        out.pending = [list(p) for p in out.pending]  # copies: a repeated sequence's amateurs lag apart
        return out

    def kept(self, seqs: Sequence[int]) -> "AmateurLag":
        """Only sequences `seqs`, renumbered 0.. in that order."""
        return self._pick(seqs)

    def merged(self, other: "AmateurLag") -> "AmateurLag":
        """This batch's sequences followed by `other`'s."""
        return AmateurLag(self.cobatch_steps, *(getattr(self, n) + getattr(other, n) for n in _PER_SEQUENCE))

    def repeated(self, times: int) -> "AmateurLag":
        """Every sequence `times` times in a row (beam search)."""
        return self._pick([s for s in range(len(self)) for _ in range(times)])

    def reordered(self, source: Sequence[int]) -> "AmateurLag":
        """Sequence s takes over sequence source[s]'s amateur (beams); the counts stay per sequence."""
        out = self._pick(source)
        out.needed, out.steps = list(self.needed), list(self.steps)
        return out


_PER_SEQUENCE = ("contrastive", "pending", "cobatched", "started", "quiet", "needed", "steps")
