"""The running batch of greedy / sampled sequences; sequences may join and leave between steps.

    batch = RunningBatch(runner)
    batch.join(requests, keys)          # prefill the new rows, merge them into the batch
    while batch:
        for key, event in batch.step(): # pick a token per sequence, forward the survivors
            ...
        batch.drop([...])               # e.g. a client went away

The runner (`cold.runner.ModelRunner`) does every forward pass and owns the batch state; this
loop holds that state, the sampler settings and a detokeniser per sequence.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import torch

from cold.runner.model_runner import ModelRunner
from cold.runner.rows import layout_of
from cold.runner.state import BatchState
from cold.sampling.detokenize import TextTracker
from cold.sampling.sampler import Sampler
from cold.sampling.scoring import score_log_probs, top_log_probs
from cold.sampling.stopping import finish_reason
from cold.types import Request, StreamEvent, TokenLogprob


class RunningBatch:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.requests: list[Request] = []  # live sequences; position = sequence index in the layout
        self.keys: list[Hashable] = []  # caller's handle of each live sequence
        self.trackers: list[TextTracker] = []  # each live sequence's detokeniser
        self.state: BatchState | None = None
        self.sampler: Sampler | None = None

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def cache(self):
        return None if self.state is None else self.state.cache

    @property
    def joinable(self) -> bool:
        """Whether new sequences can join now: not while it holds sliding-window caches (Gemma),
        whose rows share one fill count and cannot be left-padded into line; `join` would refuse."""
        return self.state is None or not self.state.sliding

    def join(self, requests: list[Request], keys: list[Hashable]) -> None:
        """Prefill `requests` and add them to the batch (between steps)."""
        if not requests:
            return
        runner = self.runner
        with torch.inference_mode():
            layout = layout_of(requests, runner.device)
            state = runner.prefill([r.prompt_ids for r in requests], layout, max(r.params.max_new_tokens for r in requests))
            sampler = Sampler.build([r.params for r in requests], runner.device)
            if self.state is None:
                self.state, self.sampler = state, sampler
            else:
                self.state, self.sampler = runner.merge(self.state, state), self.sampler.merged(sampler)
        self.requests += requests
        self.keys += keys
        self.trackers += [TextTracker(runner.tokenizer, r.params.stop) for r in requests]

    def step(self) -> list[tuple[Hashable, StreamEvent]]:
        """Pick one token for every sequence; return (key, StreamEvent) for each; advance the rest."""
        runner = self.runner
        with torch.inference_mode():
            expert = runner.expert_logits(self.state)  # [S, V]
            score = runner.scores(self.state, self.sampler, expert)  # [S, V]
            tokens = self.sampler.pick(score)  # [S]
            reported = reported_logprobs(self.requests, expert, score, tokens)
            events, kept = [], []
            for seq, token in enumerate(tokens.tolist()):
                request, tracker = self.requests[seq], self.trackers[seq]
                text = tracker.add(token)
                reason = finish_reason(token, len(tracker.ids), request.params, runner.eos_ids, tracker.stopped)
                event = StreamEvent(index=self.keys[seq], text=text, token_ids=[token], finish_reason=reason)
                if seq in reported:
                    event.logprobs = [reported[seq]]
                if reason is None:
                    kept.append(seq)
                else:
                    event.text += tracker.flush()
                    event.amateur_steps = self.state.amateur.needed[seq] if request.params.contrastive else None
                events.append((self.keys[seq], event))
            if len(kept) < len(self.requests):
                self._keep(kept)
                tokens = tokens[kept]
            if self.requests:
                runner.step(self.state, tokens)
        return events

    def drop(self, keys) -> None:
        """Remove sequences (by key) between steps, for example when their client disconnected."""
        gone = set(keys)
        kept = [s for s, k in enumerate(self.keys) if k not in gone]
        if len(kept) < len(self.keys):
            with torch.inference_mode():
                self._keep(kept)

    def _keep(self, kept: list[int]) -> None:
        self.requests = [self.requests[s] for s in kept]
        self.keys = [self.keys[s] for s in kept]
        self.trackers = [self.trackers[s] for s in kept]
        self.state = self.runner.keep(self.state, kept)
        self.sampler = self.sampler.kept(kept) if kept else None


def reported_logprobs(requests: list[Request], expert: torch.Tensor, score: torch.Tensor,
                      tokens: torch.Tensor) -> dict[int, TokenLogprob]:
    """{sequence: its new token's log-probability and best alternatives} for the sequences whose
    params ask for logprobs, from this step's expert logits and scores [S, V] and tokens [S]."""
    seqs = [s for s, r in enumerate(requests) if r.params.logprobs is not None]
    if not seqs:
        return {}
    rows = torch.tensor(seqs, device=expert.device)
    cold = torch.tensor([requests[s].params.logprob_score == "cold" for s in seqs], device=expert.device)
    own = expert[rows]  # [L, V]
    log_probs = torch.where(cold[:, None], score_log_probs(own, score[rows]), torch.log_softmax(own.float(), dim=-1))
    top = max(requests[s].params.logprobs for s in seqs)
    out = {}
    for s, (chosen, best) in zip(seqs, top_log_probs(log_probs, tokens[rows], top)):
        out[s] = TokenLogprob(int(tokens[s]), chosen, best[: requests[s].params.logprobs])
    return out


def decode(runner: ModelRunner, requests: list[Request]) -> Iterator[StreamEvent]:
    """Decode requests together until every one has finished (events keyed by request index)."""
    batch = RunningBatch(runner)
    batch.join(requests, list(range(len(requests))))
    try:
        while batch:
            for _, event in batch.step():
                yield event
    finally:  # also when the caller stops early: the runner frees what the sequences held (llama.cpp's slots)
        batch.drop(list(batch.keys))
