"""The running batch of greedy / sampled sequences; sequences may join and leave between steps.

    batch = RunningBatch(engine)
    batch.join(requests, keys)          # prefill the new rows, merge them into the batch
    while batch:
        for key, event in batch.step(): # pick a token per sequence, forward the survivors
            ...
        batch.drop([...])               # e.g. a client went away

Rows are left-padded: joining rows whose caches are shorter (or longer) are padded on the left
with masked-out zeros, which leaves the attention of every row exactly as it was. Columns that
are padding for every row are trimmed when sequences leave.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from transformers import DynamicCache

from cold.sampling import scoring
from cold.runner.rows import RowLayout, RowSpec
from cold.errors import ColdError
from cold.sampling.detokenize import TextTracker


class RunningBatch:
    def __init__(self, engine):
        self.engine = engine
        self.device = engine.device
        self.requests: list = []  # live sequences; position = sequence index in the layout
        self.keys: list[Hashable] = []  # caller's handle of each live sequence
        self.layout: RowLayout | None = None
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [R, L] 1 = real token
        self.positions: torch.Tensor | None = None  # [R] position of each row's next token
        self.hidden: torch.Tensor | None = None  # [R, H] last hidden state of each row, not yet picked from

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def joinable(self) -> bool:
        """Whether new sequences can join now: not while it holds sliding-window caches (Gemma),
        whose rows share one fill count and cannot be left-padded into line; `join` would refuse."""
        return self.cache is None or not any(layer.is_sliding for layer in self.cache.layers)

    # ---- joining ----------------------------------------------------------------------------

    def join(self, requests: list, keys: list[Hashable]) -> None:
        """Prefill `requests` and add them to the batch (between steps)."""
        if not requests:
            return
        for r in requests:
            r.tracker = TextTracker(self.engine.tokenizer, r.params.stop)
            r.generator = _generator(r.params.seed, self.device) if r.params.do_sample else None
        with torch.inference_mode():
            layout = RowLayout.build(self.engine.row_specs(requests), len(requests), self.device)
            hidden, cache, mask, positions = self.engine.prefill(requests, layout)
            if self.layout is None:
                self.layout, self.cache, self.mask, self.positions, self.hidden = layout, cache, mask, positions, hidden
            else:
                self._merge(layout, cache, mask, positions, hidden)
        self.requests += requests
        self.keys += keys

    def _merge(self, layout, cache, mask, positions, hidden) -> None:
        offset = len(self.requests)
        rows = self.layout.rows + [RowSpec(r.seq + offset, r.role, r.adapter, r.scale) for r in layout.rows]
        self.layout = RowLayout.build(rows, offset + len(layout.expert_row), self.device)
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            if mine.is_sliding or theirs.is_sliding:
                raise ColdError("joining a running batch needs a model without sliding-window caches")
            mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
            mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.hidden = torch.cat([self.hidden, hidden])

    # ---- stepping ---------------------------------------------------------------------------

    def step(self) -> list[tuple[Hashable, object]]:
        """Pick one token for every sequence; return (key, StreamEvent) for each; advance the rest."""
        from cold.decoding.engine import StreamEvent

        with torch.inference_mode():
            tokens = self._pick(self.engine.scores(self.hidden, self.layout, self.requests))
            events, finished = [], []
            for seq, (request, key) in enumerate(zip(self.requests, self.keys)):
                token = int(tokens[seq])
                text, reason = self._advance(request, token)
                events.append((key, StreamEvent(index=key, text=text, token_ids=[token], finish_reason=reason)))
                if reason is not None:
                    finished.append(seq)
            kept = [s for s in range(len(self.requests)) if s not in set(finished)]
            if finished:
                self._keep(kept)
                tokens = tokens[torch.tensor(kept, dtype=torch.long, device=self.device)]
            if self.requests:
                self._forward(tokens)
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
        if not kept:
            self.layout = self.cache = self.mask = self.positions = self.hidden = None
            return
        self.layout, old_rows = self.layout.keep(kept, self.device)
        self.cache.batch_select_indices(old_rows)
        self.mask, self.positions, self.hidden = self.mask[old_rows], self.positions[old_rows], self.hidden[old_rows]
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Drop leading columns that are padding in every row."""
        real = self.mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start > 0 and not any(layer.is_sliding for layer in self.cache.layers):
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _forward(self, tokens: torch.Tensor) -> None:
        """Feed each sequence's chosen token to all of its rows."""
        row_tokens = tokens[torch.tensor([r.seq for r in self.layout.rows], device=self.device)]  # [R]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.hidden = self.engine.forward(self.layout, row_tokens[:, None], self.mask, self.positions[:, None], self.cache)
        self.positions = self.positions + 1

    def _pick(self, score: torch.Tensor) -> torch.Tensor:
        """[S] next token: argmax, or a sample from each sampling sequence's own generator."""
        tokens = scoring.pick_greedy(score)
        for seq, request in enumerate(self.requests):
            p = request.params
            if p.do_sample:
                one = lambda v, dt: torch.tensor([v], dtype=dt, device=score.device)  # noqa: E731
                tokens[seq] = scoring.pick_sample(
                    score[seq : seq + 1], one(p.temperature, torch.float32), one(p.top_k, torch.long),
                    one(p.top_p, torch.float32), request.generator,
                )[0]
        return tokens

    def _advance(self, request, token: int) -> tuple[str, str | None]:
        """Append one token to a sequence; return its new text and finish reason (or None)."""
        tracker = request.tracker
        text = tracker.add(token)
        reason = None
        if (token in self.engine.eos_ids and not request.params.ignore_eos) or tracker.stopped:
            reason = "stop"
        elif len(tracker.ids) >= request.params.max_new_tokens:
            reason = "length"
        if reason is not None:
            text += tracker.flush()
        return text, reason


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _generator(seed: int | None, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
