"""Properties of the pure scoring functions and of stop-string handling."""

from __future__ import annotations

import math

import pytest
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
@given(expert=logits_strategy, seed=st.integers(0, 1000), alpha=st.floats(0.01, 1.0), beta=st.floats(0.0, 5.0))
def test_a_constant_beta_schedule_is_todays_score(expert, seed, alpha, beta):
    amateur = torch.randn(expert.shape, generator=torch.Generator().manual_seed(seed))
    rows = expert.shape[0]
    alphas, betas = torch.full((rows,), alpha), torch.full((rows,), beta)
    valid = scoring.plausibility_mask(expert, alphas)
    for form in ("logit", "logprob"):
        today = scoring.contrastive_scores(expert, amateur, alphas, betas, form)
        for schedules in (None, ["constant"] * rows):
            assert torch.equal(scoring.contrastive_scores_by_form(expert, amateur, betas, [form] * rows, valid, schedules), today)
    assert torch.equal(scoring.cold_log_probs(expert, amateur, alphas, betas, schedule="constant"),
                       scoring.cold_log_probs(expert, amateur, alphas, betas))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp(min=1e-300).log()).sum(-1)


@settings(max_examples=60, deadline=None)
@given(expert=logits_strategy, seed=st.integers(0, 1000))
def test_schedule_weights_follow_their_definitions(expert, seed):
    amateur = torch.randn(expert.shape, generator=torch.Generator().manual_seed(seed)) * 3
    p, q = torch.softmax(expert.double(), -1), torch.softmax(amateur.double(), -1)
    entropy = scoring.entropy_weight(expert)
    torch.testing.assert_close(entropy.double(), _entropy(p) / math.log(expert.shape[-1]), atol=1e-5, rtol=0)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp(min=1e-300).log() - b.clamp(min=1e-300).log())).sum(-1)  # noqa: E731
    jsd = scoring.jsd_weight(expert, amateur)
    torch.testing.assert_close(jsd.double(), ((kl(p, m) + kl(q, m)) / 2 / math.log(2)).clamp(0, 1), atol=1e-5, rtol=0)
    for weight in (entropy, jsd):
        assert torch.all((weight >= 0) & (weight <= 1))
    torch.testing.assert_close(scoring.jsd_weight(expert, expert), torch.zeros(expert.shape[0]), atol=1e-5, rtol=0)


def test_schedule_weights_at_their_extremes():
    vocab = 64
    uniform, peaked = torch.zeros(1, vocab), torch.full((1, vocab), -1e4)
    peaked[0, 3] = 0.0
    other = torch.full((1, vocab), -1e4)
    other[0, 9] = 0.0
    assert float(scoring.entropy_weight(uniform)) == pytest.approx(1.0, abs=1e-5)
    assert float(scoring.entropy_weight(peaked)) == pytest.approx(0.0, abs=1e-5)
    assert float(scoring.jsd_weight(peaked, other)) == pytest.approx(1.0, abs=1e-5)  # no token in common


@settings(max_examples=40, deadline=None)
@given(expert=logits_strategy, seed=st.integers(0, 1000), beta=st.floats(0.0, 20.0))
def test_a_scheduled_score_is_todays_score_at_the_scaled_beta(expert, seed, beta):
    """A batch mixing schedules scores each sequence as `contrastive_scores` at its own beta x weight."""
    amateur = torch.randn(expert.shape, generator=torch.Generator().manual_seed(seed))
    rows = expert.shape[0]
    schedules = [("constant", "entropy", "jsd")[i % 3] for i in range(rows)]
    alphas, betas = torch.full((rows,), 0.1), torch.full((rows,), beta)
    valid = scoring.plausibility_mask(expert, alphas)
    got = scoring.contrastive_scores_by_form(expert, amateur, betas, ["logit"] * rows, valid, schedules)
    for row, schedule in enumerate(schedules):
        e, a = expert[row : row + 1], amateur[row : row + 1]
        weight = {"constant": 1.0, "entropy": float(scoring.entropy_weight(e)), "jsd": float(scoring.jsd_weight(e, a))}[schedule]
        want = scoring.contrastive_scores(e, a, alphas[:1], torch.tensor([beta * weight]))
        torch.testing.assert_close(got[row : row + 1], want, rtol=1e-5, atol=1e-5)


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
