"""Pure tensor functions that turn next-token logits into the next token.

Shapes: S sequences, V vocabulary entries. `expert` and `amateur` are raw logits [S, V];
per-sequence parameters are tensors [S] (so one batch can mix settings).

    valid(i)  =  s_e[i] >= log(alpha) + max_k s_e[k]
    score[i]  =  (1 + beta) * s_e[i] - beta * s_a[i]    if valid(i) else -inf    ("logit" form)
    score[i]  =  log p_e[i] - beta/(1+beta) * log p_a[i]  if valid(i) else -inf    ("logprob" form, Li et al.)

alpha = 0 disables the mask; beta = 0 gives back the expert's own logits exactly.

A beta schedule scales beta per sequence and step by a weight in [0, 1] (`contrast_weights`):
"entropy" by the expert's entropy over log V, "jsd" by the Jensen-Shannon divergence between the
expert's and the amateur's full next-token distributions over log 2 (in the spirit of AdaCAD), so
the contrast fades where the expert is sure, or where the amateur agrees with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cold.params import SCORING_FORMS

NEG_INF = float("-inf")
# Nats below the expert's own log-probability that a token outside the plausible set is given
# when CoLD scores a text (`cold_log_probs`): finite, ordered as the expert orders them, and below
# what the same token would score inside the set.
OUTSIDE_PENALTY = 10.0


def plausibility_threshold(expert: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """[S, 1]: the lowest logit inside the mask, log(alpha) + the top logit."""
    return torch.log(alpha.to(expert.dtype))[:, None] + expert.amax(dim=-1, keepdim=True)  # amax: no argmax kept


def plausibility_mask(expert: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """[S, V] bool: tokens whose expert probability is at least alpha times the top one."""
    return expert >= plausibility_threshold(expert, alpha)


def contrastive_scores(
    expert: torch.Tensor,
    amateur: torch.Tensor,
    alpha: torch.Tensor | None,
    beta: torch.Tensor,
    form: str = "logit",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """[S, V] CoLD scores, -inf outside the plausibility mask.

    `valid`: the plausibility mask [S, V], when the caller has it already (alpha is then unused);
    the logit form then also accepts some columns only (expert, amateur and valid all [S, K], the
    mask taken over all V).
    """
    beta = beta.to(expert.dtype)[:, None]
    if form == "logit":
        score = (1 + beta) * expert - beta * amateur
    elif form == "logprob":
        score = torch.log_softmax(expert, dim=-1) - (beta / (1 + beta)) * torch.log_softmax(amateur, dim=-1)
    else:
        raise ValueError(f"scoring form must be one of {SCORING_FORMS}, got {form!r}")
    if valid is None:
        valid = plausibility_mask(expert, alpha)
    return score.masked_fill(~valid, NEG_INF)


def entropy_weight(expert: torch.Tensor) -> torch.Tensor:
    """[S] the expert's entropy at this step over log V, in [0, 1]: 0 where it is certain."""
    probs = torch.softmax(expert.float(), dim=-1)
    return torch.special.entr(probs).sum(dim=-1) / math.log(expert.shape[-1])


def jsd_weight(expert: torch.Tensor, amateur: torch.Tensor) -> torch.Tensor:
    """[S] Jensen-Shannon divergence of the expert's and the amateur's next-token distributions over
    log 2, in [0, 1]: 0 where they agree, 1 where they share no token."""
    p, q = torch.softmax(expert.float(), dim=-1), torch.softmax(amateur.float(), dim=-1)
    entropy = lambda probs: torch.special.entr(probs).sum(dim=-1)  # noqa: E731
    jsd = entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2
    return (jsd / math.log(2)).clamp(0.0, 1.0)


def scheduled_beta(beta: torch.Tensor, schedules: Sequence[str] | None, expert: torch.Tensor,
                   amateur: torch.Tensor | None = None) -> torch.Tensor:
    """[S] each sequence's beta at this step: `beta` [S] times its schedule's weight (`schedules` [S]:
    "constant" keeps beta; "entropy" needs the full expert logits [S, V], "jsd" the amateur's too)."""
    if not schedules or all(s == "constant" for s in schedules):
        return beta
    weights = torch.ones_like(beta, dtype=torch.float32)
    for schedule in set(schedules) - {"constant"}:
        idx = torch.tensor([i for i, s in enumerate(schedules) if s == schedule], device=expert.device)
        if schedule == "entropy":
            weights[idx] = entropy_weight(expert[idx])
        elif schedule == "jsd":
            if amateur is None:
                raise ValueError("the jsd schedule needs the amateur's logits")
            weights[idx] = jsd_weight(expert[idx], amateur[idx])
        else:
            raise ValueError(f"unknown beta schedule {schedule!r}")
    return beta * weights.to(beta.dtype)


def contrastive_scores_by_form(
    expert: torch.Tensor, amateur: torch.Tensor, beta: torch.Tensor, forms: list[str], valid: torch.Tensor,
    schedules: Sequence[str] | None = None,
) -> torch.Tensor:
    """[S, V] CoLD scores of sequences that each name their score form (`forms` [S]) and beta
    schedule (`schedules` [S], None: constant), given their plausibility mask `valid` [S, V]."""
    beta = scheduled_beta(beta, schedules, expert, amateur)
    if len(set(forms)) == 1:
        return contrastive_scores(expert, amateur, None, beta, forms[0], valid)
    out = torch.empty_like(expert)
    for form in set(forms):
        idx = torch.tensor([i for i, f in enumerate(forms) if f == form], device=expert.device)
        out[idx] = contrastive_scores(expert[idx], amateur[idx], None, beta[idx], form, valid[idx])
    return out


def cold_log_probs(
    expert: torch.Tensor, amateur: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, form: str = "logit",
    penalty: float = OUTSIDE_PENALTY, schedule: str = "constant",
) -> torch.Tensor:
    """[S, V] float32 log-probabilities of CoLD's score, finite for every token, to score a given
    text: `score_log_probs` of the CoLD score (alpha, beta, form, beta schedule) of these logits."""
    beta = scheduled_beta(beta, [schedule] * len(beta), expert, amateur)
    return score_log_probs(expert, contrastive_scores(expert, amateur, alpha, beta, form), penalty)


def score_log_probs(expert: torch.Tensor, score: torch.Tensor, penalty: float = OUTSIDE_PENALTY) -> torch.Tensor:
    """[S, V] float32 log-probabilities of a decoding score [S, V] (-inf where CoLD's plausibility
    mask drops a token), finite for every token.

    Where the score is finite: its log-softmax over those tokens (what greedy and sampled decoding
    choose from; for a plain expert score, the expert's log-softmax). Where it is -inf: the
    expert's own log-probability minus `penalty`, so that a text with one implausible token is not
    impossible (a multiple-choice question whose every answer leaves the mask would otherwise tie
    at -inf) and implausible tokens keep the expert's order among themselves.
    """
    inside = score.isfinite()
    return torch.where(inside, torch.log_softmax(score.float(), dim=-1), torch.log_softmax(expert.float(), dim=-1) - penalty)


def top_log_probs(log_probs: torch.Tensor, tokens: torch.Tensor, top: int) -> list:
    """Per row of `log_probs` [S, V]: (log p of tokens[s], the `top` best (id, log p), best first)."""
    chosen = log_probs.gather(-1, tokens[:, None])[:, 0].tolist()
    if not top:
        return [(c, []) for c in chosen]
    best = log_probs.topk(top, dim=-1)
    return [(c, list(zip(i.tolist(), v.tolist()))) for c, v, i in zip(chosen, best.values, best.indices)]


def apply_temperature(score: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return score / temperature.to(score.dtype)[:, None]


def apply_top_k(score: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the k best entries per row (k <= 0 keeps all)."""
    vocab = score.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    sorted_scores = score.sort(dim=-1, descending=True).values
    kth = sorted_scores.gather(-1, (k - 1)[:, None])  # [S, 1]
    return score.masked_fill(score < kth, NEG_INF)


def apply_top_p(score: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of best entries whose probability reaches top_p (at least one)."""
    sorted_scores, order = score.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better entries
    drop_sorted = mass_before >= top_p.to(probs.dtype)[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return score.masked_fill(drop, NEG_INF)


def pick_greedy(score: torch.Tensor) -> torch.Tensor:
    """[S] index of the best score."""
    return score.argmax(dim=-1)


def pick_sample(
    score: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """[S] sampled index from softmax(score / temperature) after top-k and top-p."""
    return torch.multinomial(sample_probs(score, temperature, top_k, top_p), num_samples=1, generator=generator).squeeze(-1)


def sample_probs(score: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[S, V] float32 probabilities to sample from: softmax(score / temperature) after top-k and top-p."""
    warped = apply_top_p(apply_top_k(apply_temperature(score, temperature), top_k), top_p)
    return torch.softmax(warped.float(), dim=-1)


def beam_log_probs(score: torch.Tensor) -> torch.Tensor:
    """[S, V] log-softmax of the score over the valid set (-inf outside), for ranking beams."""
    return torch.log_softmax(score.float(), dim=-1)
