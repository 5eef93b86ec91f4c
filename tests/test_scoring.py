"""Properties of the pure scoring functions and of stop-string handling."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cold.sampling import scoring
from cold.sampling.detokenize import TextTracker

logits_strategy = st.builds(
    lambda seed, rows, vocab, spread: torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * spread,
    st.integers(0, 10_000), st.integers(1, 4), st.integers(2, 50), st.floats(0.1, 10),
)


@settings(max_examples=60, deadline=None)
@given(expert=logits_strategy, alpha=st.floats(1e-4, 1.0))
def test_mask_is_probability_ratio_and_keeps_the_top_token(expert, alpha):
    mask = scoring.plausibility_mask(expert, torch.full((expert.shape[0],), alpha))
    probs = torch.softmax(expert.double(), dim=-1)
    ratio = probs / probs.max(dim=-1, keepdim=True).values
    clear = (ratio - alpha).abs() > 1e-6  # away from float ties at the threshold
    assert torch.equal(mask[clear], (ratio >= alpha)[clear])
    assert mask.gather(-1, expert.argmax(-1, keepdim=True)).all()


@settings(max_examples=60, deadline=None)
@given(expert=logits_strategy, seed=st.integers(0, 1000), alpha=st.floats(0.01, 1.0), beta=st.floats(0.0, 5.0))
def test_contrastive_score_definition(expert, seed, alpha, beta):
    amateur = torch.randn(expert.shape, generator=torch.Generator().manual_seed(seed))
    rows = expert.shape[0]
    score = scoring.contrastive_scores(expert, amateur, torch.full((rows,), alpha), torch.full((rows,), beta))
    valid = expert >= math.log(alpha) + expert.max(dim=-1, keepdim=True).values
    torch.testing.assert_close(score[valid], ((1 + beta) * expert - beta * amateur)[valid])
    assert torch.all(score[~valid] == float("-inf"))
    logprob = scoring.contrastive_scores(expert, amateur, torch.full((rows,), alpha), torch.full((rows,), beta), "logprob")
    # Same greedy choice: (1 + beta) * logprob-form score = logit-form score + a constant per row.
    for row in range(rows):
        diff = (logprob[row] * (1 + beta) - score[row])[valid[row]]
        torch.testing.assert_close(diff, diff.mean().expand_as(diff), atol=1e-3, rtol=0)


def test_beta_zero_returns_the_expert_logits_exactly():
    expert, amateur = torch.randn(3, 40), torch.randn(3, 40)
    score = scoring.contrastive_scores(expert, amateur, torch.zeros(3), torch.zeros(3))
    assert torch.equal(score, expert)


@settings(max_examples=60, deadline=None)
@given(score=logits_strategy, k=st.integers(0, 60), p=st.floats(0.01, 1.0), seed=st.integers(0, 100))
def test_warpers_keep_at_least_one_token_and_sampling_stays_inside(score, k, p, seed):
    rows = score.shape[0]
    score = score.clone()
    score[:, ::3] = float("-inf")  # some tokens already masked out
    score[:, 1] = score[:, 1].clamp(min=-1e9)  # but never all
    kept = scoring.apply_top_p(scoring.apply_top_k(score, torch.full((rows,), k)), torch.full((rows,), p))
    assert torch.all(torch.isfinite(kept).sum(-1) >= 1)
    assert torch.all(torch.isfinite(kept) <= torch.isfinite(score))
    if k > 0:
        assert torch.all(torch.isfinite(kept).sum(-1) <= k)
    gen = torch.Generator().manual_seed(seed)
    picked = scoring.pick_sample(score, torch.ones(rows), torch.full((rows,), k), torch.full((rows,), p), gen)
    assert torch.all(torch.isfinite(kept.gather(-1, picked[:, None])))


class CharTokenizer:
    """One token per character: enough to test stop strings and streaming."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(tracker, text):
    return [tracker.add(ord(c)) for c in text]


def test_stop_string_across_tokens_is_cut_and_never_streamed():
    tracker = TextTracker(CharTokenizer(), stop=("STOP", "\n\n"))
    deltas = feed(tracker, "abc ST")
    assert "".join(deltas) == "abc "  # "ST" held back: it may start "STOP"
    deltas += feed(tracker, "OP tail")
    assert tracker.stopped and tracker.text == "abc "
    assert "".join(deltas) + tracker.flush() == "abc "


def test_false_alarm_prefix_is_released():
    tracker = TextTracker(CharTokenizer(), stop=("STOP",))
    deltas = feed(tracker, "STAR")
    assert not tracker.stopped
    assert "".join(deltas) + tracker.flush() == "STAR"
