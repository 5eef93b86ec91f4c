"""Beam search over the CoLD score (or plain logits for expert/base decoders).

Each prompt keeps `num_beams` beams; each beam owns its own expert row (and amateur row), so the
batch has S * num_beams * (1 or 2) rows. Beams are ranked by the running sum of
log-softmax(score) over the valid set. A beam that emits EOS or a stop string is finished with
score / length ** length_penalty; a prompt is done once it holds num_beams finished beams
(early stopping) or reaches max_new_tokens. With num_beams = 1 this is exactly greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cold.runner.model_runner import ModelRunner
from cold.runner.rows import layout_of
from cold.sampling import scoring
from cold.sampling.detokenize import TextTracker
from cold.sampling.sampler import Sampler
from cold.sampling.stopping import finish_reason
from cold.types import Request, StreamEvent


@dataclass
class _Hypothesis:
    ids: list[int]
    score: float  # length-normalised
    text: str
    reason: str


def beam_search(runner: ModelRunner, requests: list[Request]) -> Iterator[StreamEvent]:
    """Decode requests that all ask for the same `num_beams`; one event per request, at the end."""
    beams = requests[0].params.num_beams
    device = runner.device
    num = len(requests)
    with torch.inference_mode():
        max_new = max(r.params.max_new_tokens for r in requests)
        state = runner.prefill([r.prompt_ids for r in requests], layout_of(requests, device), max_new, amateur_prompts=True)
        sampler = Sampler.build([r.params for r in requests], device).repeated(beams)

        beam_scores = torch.full((num, beams), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0  # only the first copy is live at the start
        trackers = [[TextTracker(runner.tokenizer, r.params.stop) for _ in range(beams)] for r in requests]
        finished: list[list[_Hypothesis]] = [[] for _ in range(num)]
        done = [False] * num

        try:
            runner.repeat_rows(state, beams)  # beam sequence s * beams + b starts as a copy of sequence s
            for _ in range(max_new):
                log_probs = scoring.beam_log_probs(runner.scores(state, sampler, runner.expert_logits(state)))  # [S*B, V]
                vocab = log_probs.shape[-1]
                totals = (beam_scores.view(-1, 1) + log_probs).view(num, beams * vocab)
                top_scores, top_index = totals.topk(2 * beams, dim=-1)  # [S, 2B]
                source = torch.arange(num * beams, device=device).view(num, beams).clone()
                next_tokens = torch.full((num, beams), runner.pad_id, dtype=torch.long, device=device)
                new_scores = torch.full((num, beams), float("-inf"), device=device)
                new_trackers = [list(t) for t in trackers]
                for s, request in enumerate(requests):
                    if done[s]:
                        continue
                    params = request.params
                    chosen = 0
                    for score, index in zip(top_scores[s].tolist(), top_index[s].tolist()):
                        if score == float("-inf") or chosen == beams:
                            break
                        beam, token = divmod(index, vocab)
                        tracker = trackers[s][beam].fork()
                        tracker.add(token)
                        reason = finish_reason(token, len(tracker.ids), params, runner.eos_ids, tracker.stopped)
                        if reason is not None:
                            tracker.flush()
                            finished[s].append(_Hypothesis(tracker.ids, score / len(tracker.ids) ** params.length_penalty,
                                                           tracker.text, reason))
                            continue
                        source[s, chosen] = s * beams + beam
                        next_tokens[s, chosen] = token
                        new_scores[s, chosen] = score
                        new_trackers[s][chosen] = tracker
                        chosen += 1
                    if len(finished[s]) >= beams or chosen == 0:
                        done[s] = True
                if all(done):
                    break
                beam_scores, trackers = new_scores, new_trackers
                runner.reorder(state, source.view(-1))  # every row (expert and amateur) follows its beam's source
                runner.step(state, next_tokens.view(-1))
        finally:
            runner.keep(state, [])  # a runner whose sequences hold resources (llama.cpp's slots) frees them

    for s in range(num):
        best = max(finished[s], key=lambda h: h.score) if finished[s] else _Hypothesis([], 0.0, "", "length")
        yield StreamEvent(index=s, text=best.text, token_ids=best.ids, finish_reason=best.reason)
