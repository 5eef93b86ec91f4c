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

from cold.sampling import scoring
from cold.runner.rows import RowLayout, RowSpec
from cold.sampling.detokenize import TextTracker


@dataclass
class _Hypothesis:
    ids: list[int]
    score: float  # length-normalised
    text: str
    reason: str


def _expand(rows: list[RowSpec], beams: int) -> list[RowSpec]:
    """Each row becomes `beams` consecutive rows; sequence s becomes beam sequences s*beams + b."""
    return [RowSpec(r.seq * beams + b, r.role, r.adapter, r.scale) for r in rows for b in range(beams)]


def beam_search(engine, requests) -> Iterator["object"]:
    from cold.decoding.engine import StreamEvent

    beams = requests[0].params.num_beams
    device = engine.device
    with torch.inference_mode():
        base_layout = RowLayout.build(engine.row_specs(requests), len(requests), device)
        hidden, cache, mask, positions = engine.prefill(requests, base_layout)
        # Copy every row's prefill state to its beams: [R, ...] -> [R * beams, ...]
        cache.batch_repeat_interleave(beams)
        hidden = hidden.repeat_interleave(beams, dim=0)
        mask = mask.repeat_interleave(beams, dim=0)
        positions = positions.repeat_interleave(beams, dim=0)
        layout = RowLayout.build(_expand(base_layout.rows, beams), len(requests) * beams, device)
        beam_requests = [r for r in requests for _ in range(beams)]  # one entry per beam sequence

        num = len(requests)
        beam_scores = torch.full((num, beams), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0  # only the first copy is live at the start
        beam_ids: list[list[list[int]]] = [[[] for _ in range(beams)] for _ in range(num)]
        finished: list[list[_Hypothesis]] = [[] for _ in range(num)]
        done = [False] * num
        max_new = max(r.params.max_new_tokens for r in requests)

        for step in range(1, max_new + 1):
            log_probs = scoring.beam_log_probs(engine.scores(hidden, layout, beam_requests))  # [S*B, V]
            vocab = log_probs.shape[-1]
            totals = (beam_scores.view(-1, 1) + log_probs).view(num, beams * vocab)
            top_scores, top_index = totals.topk(2 * beams, dim=-1)  # [S, 2B]
            source = torch.arange(num * beams, device=device).view(num, beams).clone()
            next_tokens = torch.full((num, beams), engine.pad_id, dtype=torch.long, device=device)
            new_scores = torch.full((num, beams), float("-inf"), device=device)
            new_ids = [list(b) for b in beam_ids]
            for s, request in enumerate(requests):
                if done[s]:
                    continue
                params = request.params
                chosen = 0
                for score, index in zip(top_scores[s].tolist(), top_index[s].tolist()):
                    if score == float("-inf") or chosen == beams:
                        break
                    beam, token = divmod(index, vocab)
                    ids = beam_ids[s][beam] + [token]
                    tracker = TextTracker(engine.tokenizer, params.stop)
                    for t in ids:
                        tracker.add(t)
                    if (token in engine.eos_ids and not params.ignore_eos) or tracker.stopped:
                        finished[s].append(_Hypothesis(ids, score / len(ids) ** params.length_penalty, tracker.text, "stop"))
                        continue
                    if len(ids) >= params.max_new_tokens:
                        finished[s].append(_Hypothesis(ids, score / len(ids) ** params.length_penalty, tracker.text, "length"))
                        continue
                    source[s, chosen] = s * beams + beam
                    next_tokens[s, chosen] = token
                    new_scores[s, chosen] = score
                    new_ids[s][chosen] = ids
                    chosen += 1
                if len(finished[s]) >= beams or chosen == 0:
                    done[s] = True
            if all(done):
                break
            beam_scores, beam_ids = new_scores, new_ids
            # Reorder every row (expert and amateur) to follow its beam's source.
            seq_source = source.view(-1).tolist()
            row_of = {(r.seq, r.role): i for i, r in enumerate(layout.rows)}
            row_source = torch.tensor([row_of[(seq_source[r.seq], r.role)] for r in layout.rows], device=device)
            cache.reorder_cache(row_source)
            row_tokens = next_tokens.view(-1)[torch.tensor([r.seq for r in layout.rows], device=device)]
            mask = torch.cat([mask[row_source], mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[row_source]
            hidden = engine.forward(layout, row_tokens[:, None], mask, positions[:, None], cache)
            positions = positions + 1

    for s, request in enumerate(requests):
        best = max(finished[s], key=lambda h: h.score) if finished[s] else _Hypothesis([], 0.0, "", "length")
        yield StreamEvent(index=s, text=best.text, token_ids=best.ids, finish_reason=best.reason)
