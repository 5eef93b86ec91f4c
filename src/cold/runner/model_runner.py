"""The model runner: one loaded model with its row-indexed LoRA layers, run a batch at a time.

    runner = ModelRunner(base_model)                 # cold.load.models.BaseModel
    runner.set_adapters([adapter, ...])              # cold.load.adapters.LoraAdapter
    state = runner.prefill(prompt_ids, layout, max_new_tokens)   # -> BatchState
    expert = runner.expert_logits(state)             # [S, V] each sequence's expert (or base) logits
    score = runner.scores(state, sampler, expert)    # [S, V] CoLD score (those logits for expert/base)
    runner.step(state, tokens)                       # feed each sequence's token [S] to all its rows

It owns the step: it is the only code that touches the KV cache, the attention mask and the
positions (`merge`, `keep`, `repeat_rows`, `reorder` change the batch between steps). A decode
step over one adapter goes through the fused Llama step of `cold.runner.llama_step` where the
model allows it, every other forward through transformers' model with the LoRA layers installed.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from cold.errors import ColdError
from cold.load.adapters import LoraAdapter
from cold.load.models import BaseModel, eos_ids, pick_dtype
from cold.lora.layer import RowLoRALinear, install_adapters, uninstall_adapters
from cold.lora.routing import RowSelection
from cold.runner.attention import NAME as GROUPED_ATTENTION
from cold.runner.attention import use_grouped_attention
from cold.runner.kvcache import (
    catch_up_cache,
    clear_rows,
    in_place,
    merge_caches,
    move_rows,
    new_cache,
    set_live_rows,
    write_rows,
)
from cold.runner.llama_step import LeanDecoder, should_pack
from cold.runner.llama_step import supports as lean_supported
from cold.runner.rows import AMATEUR, RowLayout, RowSpec, left_pad, placed
from cold.runner.state import BatchState, GrowingMask
from cold.sampling import scoring
from cold.sampling.amateur import ALWAYS, AmateurLag, NeedShare
from cold.sampling.sampler import Sampler

PREFILL_POSITIONS = 2048  # rows x prompt columns per prefill forward (more: in chunks of columns)
# rows x new tokens up to which a chunk of several new tokens per row (a prefill, a catch-up) runs the
# lean forward; larger chunks run transformers' forward, which multiplies many rows faster on the CPU
LEAN_CHUNK_TOKENS = 256
DEFAULT_COBATCH_STEPS = 16  # the lazy amateur's default policy (bench/README.md: how it was chosen)
_INSTALLED_BY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base model -> weakref to the runner whose adapters it holds


class ModelRunner:
    """A base model with row-indexed LoRA adapters installed; prefill, step, logits and scores."""

    def __init__(self, base: BaseModel, adapters: Sequence[LoraAdapter] = (), lean: bool = True,
                 kv_dtype: str | torch.dtype | None = None, cobatch_steps: int = DEFAULT_COBATCH_STEPS):
        """`lean=False` runs every step through transformers' forward with row-indexed LoRA layers
        instead of the fused decode step of `cold.runner.llama_step`.

        `cobatch_steps` (K): the lazy amateur's policy (`cold.sampling.amateur`). After a step
        that needed a sequence's amateur, that amateur runs with the expert for K more steps, then
        lags until it is needed again; 0 is fully lazy, `ALWAYS` keeps every amateur current.

        `kv_dtype`: the dtype the KV cache stores (None: the model's). "bfloat16" under a float32
        model halves the cache's memory and the bytes attention reads; keys and values are
        rounded, so tokens can differ from the float32 cache's where scores nearly tie.
        """
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        use_grouped_attention(self.model)
        self.kv_dtype = _kv_dtype(kv_dtype, self.model)
        if not isinstance(cobatch_steps, int) or cobatch_steps < 0:
            raise ColdError(f"cobatch_steps must be an integer >= 0, got {cobatch_steps!r}")
        self.cobatch_steps = cobatch_steps
        self.need_share = NeedShare()  # decides whether joining amateurs are prefilled (cold.sampling.amateur)
        self.rows = RowSelection()
        self.adapters: list[LoraAdapter] = []
        self.lean: LeanDecoder | None = None
        self._use_lean = lean and lean_supported(self.model)
        self.set_adapters(adapters)
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return self.base.context_length

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: those the tokenizer and the embedding both know."""
        return min(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)

    def set_adapters(self, adapters: Sequence[LoraAdapter]) -> None:
        """Install exactly these adapters, stack index = position (validated first; on error nothing changes).

        They are installed in the base model's own modules, so several runners over one base model
        take turns: each reinstalls its adapters when it runs after another one has (`_route`)."""
        if adapters:
            install_adapters(self.model, list(adapters), self.rows)
        else:
            uninstall_adapters(self.model)
        self.adapters = list(adapters)
        self.lean = LeanDecoder(self.model, pack=should_pack(self.model)) if self._use_lean else None
        _INSTALLED_BY[self.model] = weakref.ref(self)

    # ---- forward passes -----------------------------------------------------------------------

    def forward(self, layout: RowLayout, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """One forward pass of all rows through the decoder; returns the last hidden states [R, H].

        input_ids, position_ids [R, T]; attention_mask [R, L] (the new columns included). The
        vocabulary projection is left to `scores`, which needs it in full only for expert rows.
        """
        self._route(layout)
        try:
            lean_sized = input_ids.shape[1] == 1 or input_ids.numel() <= LEAN_CHUNK_TOKENS
            if self.lean is not None and self.rows.single is not None and cache is not None and lean_sized:
                return self.lean(input_ids, attention_mask, position_ids, cache, self.rows)
            out = self.model.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True,
            )
        finally:
            self.rows.clear()
        return out.last_hidden_state[:, -1]

    def logits(self, hidden: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor:
        """Full next-token logits [R, V] (float32) of hidden states [R, H]."""
        if self.lean is not None and self.lean.head is not None:
            return self._softcap(self.lean.head(hidden).float())
        head = self.model.get_output_embeddings()
        if layout is not None:
            self._route(layout)
        try:
            return self._softcap(head(hidden[:, None])[:, 0].float())
        finally:
            self.rows.clear()

    def sequence_logits(self, sequences: Sequence[Sequence[int]], layout: RowLayout) -> torch.Tensor:
        """Next-token logits at every position of every row's sequence (`sequences[seq]` of its row's
        sequence), in one pass without a cache: [R, L, V] float32, left-padded to the longest
        sequence (L columns), column j predicting column j + 1."""
        ids, mask, positions = left_pad([list(sequences[r.seq]) for r in layout.rows], self.pad_id, self.device)
        self._route(layout)
        try:
            hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                              use_cache=False).last_hidden_state
            return self._softcap(self.model.get_output_embeddings()(hidden).float())
        finally:
            self.rows.clear()

    def _route(self, layout: RowLayout) -> None:
        installed_by = _INSTALLED_BY.get(self.model)
        if installed_by is None or installed_by() is not self:  # another runner over this base model ran since
            self.set_adapters(self.adapters)
        self.rows.assign(layout.adapter, layout.scale, layout.single_adapter, layout.adapted_span)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # ---- the batch state ----------------------------------------------------------------------

    def prefill(self, prompts: Sequence[Sequence[int]], layout: RowLayout, max_new_tokens: int,
                amateur_prompts: bool | None = None) -> BatchState:
        """Run every row's prompt (`prompts[seq]` for each row's sequence); room is reserved in the
        cache for `max_new_tokens` more columns, so decoding never reallocates it. The amateur
        rows are skipped, their prompts left pending, where the policy says so (`NeedShare`),
        or as `amateur_prompts` says (beam search: True, as every beam would catch up the same prompt)."""
        ids, mask, positions = left_pad([prompts[r.seq] for r in layout.rows], self.pad_id, self.device)
        reserve = min(ids.shape[1] + max_new_tokens, self.context_length)
        rows, length = ids.shape
        cache = new_cache(self.model.config, self.kv_dtype, reserve, rows)
        sliding = any(layer.is_sliding for layer in cache.layers)  # transformers' sliding caches: one pass
        num_seqs = len(layout.expert_row)
        contrastive = (layout.amateur_row != layout.expert_row).tolist()
        # sliding-window layers write every row at every step: their amateurs stay current
        if amateur_prompts is None:
            amateur_prompts = self.need_share.prefill(self.cobatch_steps)
        lag = AmateurLag.start(prompts, contrastive, ALWAYS if sliding else self.cobatch_steps, amateur_prompts)
        active = num_seqs if any(lag.pending) else rows
        mask[active:] = 0  # the skipped rows' prompt columns are holes
        # chunks of prompt columns bound the activations a forward holds: a CoLD batch (two rows
        # per prompt) then peaks no higher than plain decoding of as many prompts
        chunk = length if sliding else max(1, PREFILL_POSITIONS // active)
        head = layout.head(active)
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            hidden = self.forward(head, ids[:active, start:end], mask[:active, :end], positions[:active, start:end], cache)
        hidden = torch.cat([hidden, hidden.new_zeros(rows - active, hidden.shape[1])])
        return BatchState(layout, cache, GrowingMask(mask, reserve), positions[:, -1] + 1, hidden, lag, active,
                          room=reserve - length)

    def step(self, state: BatchState, tokens: torch.Tensor) -> None:
        """Feed each sequence's token (tokens [S]) to its expert row and, where its amateur runs
        with it, its amateur row (a lagging amateur adds it to its pending tokens); the state
        moves one column on."""
        if state.amateur.lazy:
            self._arrange(state)
        active, rows = state.active, state.mask.rows
        row_tokens = tokens[state.layout.row_seq[:active]]  # [P]
        state.mask.append(active)
        hidden = self.forward(state.layout.head(active), row_tokens[:, None], state.mask.view[:active],
                              state.positions[:active, None], state.cache)
        state.hidden = hidden if active == rows else torch.cat([hidden, state.hidden[active:]])
        state.positions = state.positions + 1
        state.room = max(state.room - 1, 0)
        if state.amateur.lazy:
            state.amateur.fed(tokens.tolist())

    def merge(self, state: BatchState, other: BatchState) -> BatchState:
        """One state holding `state`'s sequences, then `other`'s. Rows are left-padded to one length
        with masked-out columns, which leaves every row's attention exactly as it was; the merged
        rows are both states' expert rows, then their co-batched amateur rows, then the lagging ones."""
        if state.sliding or other.sliding:
            raise ColdError("joining a running batch needs a model without sliding-window caches")
        bounds = [(len(s.layout.expert_row), s.active, s.mask.rows) for s in (state, other)]  # (S, active, R) each
        (s1, p1, r1), (s2, p2, r2) = bounds
        if (in_place(state.cache) and state.cache.layers[0].row_capacity >= r1 + r2
                and other.mask.length <= state.mask.length and other.room <= state.cache.layers[0].spare):
            return self._merge_in_place(state, other, bounds)
        length = max(state.mask.length, other.mask.length)
        # (state 0 or 1, first row, end row): [expert, expert, co-batched, co-batched, lagging, lagging]
        pieces = [(0, 0, s1), (1, 0, s2), (0, s1, p1), (1, s2, p2), (0, p1, r1), (1, p2, r2)]

        def in_order(mine, theirs) -> list:
            both = (mine, theirs)
            return [both[which][start:end] for which, start, end in pieces]

        def rows_in_order(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            return torch.cat(in_order(mine, theirs))

        # room for every row's generation, and for one more joiner's: later sequences join in place
        room = max(state.room, other.room)
        merge_caches(state.cache, other.cache, pieces, length, room + other.room)
        offset = len(state.layout.expert_row)
        theirs = [RowSpec(r.seq + offset, r.role, r.adapter, r.scale) for r in other.layout.rows]
        ordered = [spec for part in in_order(state.layout.rows, theirs) for spec in part]
        return BatchState(
            layout=RowLayout.build(ordered, offset + s2, self.device), cache=state.cache,
            mask=GrowingMask(rows_in_order(state.mask.left_padded(length), other.mask.left_padded(length)),
                             length + room + other.room),
            positions=rows_in_order(state.positions, other.positions), hidden=rows_in_order(state.hidden, other.hidden),
            amateur=state.amateur.merged(other.amateur), active=p1 + p2, room=room,
        )

    def _merge_in_place(self, state: BatchState, other: BatchState, bounds: list[tuple[int, int, int]]) -> BatchState:
        """`merge` where `state`'s buffers have spare rows for `other`'s, and room for its columns:
        `other`'s rows are written into them, and of `state`'s rows only those that the longer
        regions push out of place are moved (the layout's order, as `merge`'s, by region)."""
        (s1, p1, r1), (s2, p2, r2) = bounds
        mine, theirs = range(r1), range(r1, r1 + r2)  # members: a row of `state`, or r1 + a row of `other`
        regions = [[*mine[:s1], *theirs[:s2]], [*mine[s1:p1], *theirs[s2:p2]], [*mine[p1:], *theirs[p2:]]]
        order = placed(regions, {row: row for row in mine})  # [R] the member of each row
        self._move_to(state.cache, order, r1)
        write_rows(state.cache, *zip(*[(new, member - r1) for new, member in enumerate(order) if member >= r1]), other.cache)
        set_live_rows(state.cache, r1 + r2)
        members = torch.tensor(order, device=self.device)
        length, room = state.mask.length, max(state.room, other.room)
        offset = len(state.layout.expert_row)
        specs = state.layout.rows + [RowSpec(r.seq + offset, r.role, r.adapter, r.scale) for r in other.layout.rows]
        return BatchState(
            layout=RowLayout.build([specs[m] for m in order], offset + s2, self.device), cache=state.cache,
            mask=GrowingMask(torch.cat([state.mask.view, other.mask.left_padded(length)])[members],
                             length + state.mask.spare),
            positions=torch.cat([state.positions, other.positions])[members],
            hidden=torch.cat([state.hidden, other.hidden])[members],
            amateur=state.amateur.merged(other.amateur), active=p1 + p2, room=room,
        )

    def keep(self, state: BatchState, kept_seqs: list[int]) -> BatchState | None:
        """Only sequences `kept_seqs` (renumbered 0.. in that order); None when none is kept. Leading
        columns that are padding in every remaining row are dropped."""
        lag, kept = state.amateur, set(kept_seqs)
        self.need_share.record([lag.needed[s] for s in range(len(lag)) if s not in kept and lag.contrastive[s] and lag.steps[s]])
        if not kept_seqs:
            return None
        renumber = {old: new for new, old in enumerate(kept_seqs)}
        rows = state.layout.rows
        regions = [[], [], []]  # the kept expert, co-batched amateur and lagging amateur rows
        for index, row in enumerate(rows):
            if row.seq in renumber:
                regions[0 if row.role != AMATEUR else 1 if index < state.active else 2].append(index)
        order = placed(regions, {index: index for index in range(len(rows))})  # [R'] old row of each new row
        kept_rows = torch.tensor(order, device=self.device)
        if in_place(state.cache):  # only the rows that move are copied; the vacated ones stay as spare rows
            self._move_to(state.cache, order, len(rows))
            set_live_rows(state.cache, len(order))
        else:
            state.cache.batch_select_indices(kept_rows)
        specs = [RowSpec(renumber[rows[i].seq], rows[i].role, rows[i].adapter, rows[i].scale) for i in order]
        state.layout = RowLayout.build(specs, len(kept_seqs), self.device)
        state.active = len(regions[0]) + len(regions[1])
        state.mask.select(kept_rows)
        state.positions, state.hidden = state.positions[kept_rows], state.hidden[kept_rows]
        state.amateur = state.amateur.kept(kept_seqs)
        start = self._first_used_column(state)
        if start > 0 and not state.sliding:
            state.mask.drop_leading(start)
            for layer in state.cache.layers:
                layer.drop_leading(start)
        return state

    def _move_to(self, cache, order: list[int], existing: int) -> None:
        """Copy each of the cache's rows (the members of `order` below `existing`) to the row
        `order` puts it in, where that is another row."""
        moved = [(new, old) for new, old in enumerate(order) if old < existing and new != old]
        if moved:
            move_rows(cache, *(torch.tensor(side, device=self.device) for side in zip(*moved)))

    def _first_used_column(self, state: BatchState) -> int:
        """The first column that some row uses: a real token, or a hole a lagging row will fill."""
        used = state.mask.view.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else state.mask.length
        holes = [len(state.amateur.pending[r.seq]) for r in state.layout.rows[state.active:] if r.role == AMATEUR]
        return min([first] + [state.mask.length - n for n in holes if n])

    def repeat_rows(self, state: BatchState, times: int) -> None:
        """Every row `times` times in a row, each copy its own sequence (beam search's start)."""
        state.cache.batch_repeat_interleave(times)
        state.mask.repeat_rows(times)
        state.hidden = state.hidden.repeat_interleave(times, dim=0)
        state.positions = state.positions.repeat_interleave(times, dim=0)
        state.layout = state.layout.repeated(times, self.device)
        state.amateur = state.amateur.repeated(times)
        state.active *= times

    def reorder(self, state: BatchState, seq_source: torch.Tensor) -> None:
        """Sequence s takes over the rows (cache, mask, positions) of sequence seq_source[s] (beams)."""
        layout = state.layout
        row_source = layout.role_rows[layout.row_role, seq_source[layout.row_seq]]  # [R]
        state.cache.reorder_cache(row_source)
        state.mask.select(row_source)
        state.positions = state.positions[row_source]
        state.hidden = state.hidden[row_source]
        state.amateur = state.amateur.reordered(seq_source.tolist())

    # ---- the lazy amateur ---------------------------------------------------------------------

    def _arrange(self, state: BatchState) -> None:
        """Put the amateur rows that run at the next step (`state.amateur.cobatched`) right after
        the expert rows, swapping as few rows as possible; `state.active` counts them in."""
        layout, lag = state.layout, state.amateur
        first = len(layout.expert_row)
        cobatched = [lag.cobatched[r.seq] for r in layout.rows[first:]]
        count = sum(cobatched)
        misplaced = [first + i for i in range(count) if not cobatched[i]]  # lagging rows among the first
        strays = [first + i for i in range(count, len(cobatched)) if cobatched[i]]  # co-batched rows after them
        state.active = first + count
        if not misplaced:
            return
        source = list(range(len(layout.rows)))
        for i, j in zip(misplaced, strays):
            source[i], source[j] = j, i
        moved = torch.tensor(misplaced + strays, device=self.device)
        origin = torch.tensor(strays + misplaced, device=self.device)
        move_rows(state.cache, moved, origin)
        state.mask.move_rows(moved, origin)
        state.positions = state.positions[torch.tensor(source, device=self.device)]
        state.hidden = state.hidden[torch.tensor(source, device=self.device)]
        state.layout = layout.reordered(source, self.device)

    def _catch_up(self, state: BatchState, seqs: list[int]) -> None:
        """Feed the amateurs of sequences `seqs` their pending tokens as one multi-token chunk
        (columns the length of the longest lag, left-padded; each row writes only its own holes);
        their hidden states are then current."""
        lag, layout, length = state.amateur, state.layout, state.mask.length
        rows = layout.amateur_row[torch.tensor(seqs, device=self.device)]  # [N]
        pending = [lag.pending[s] for s in seqs]
        width = max(len(p) for p in pending)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, tokens in enumerate(pending):
            ids[i, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        ids = ids.to(self.device)
        lags = torch.tensor([len(p) for p in pending], device=self.device)
        write = torch.arange(width, device=self.device)[None] >= width - lags[:, None]  # [N, T]: the row's holes
        fresh = [row for row, s in zip(rows.tolist(), seqs) if not lag.started[s]]
        if fresh:
            clear_rows(state.cache, torch.tensor(fresh, device=self.device))
        start = length - width
        state.mask.fill(rows, start, write)
        mask = state.mask.view[rows]  # [N, L]
        positions = (state.positions[rows, None] - width + torch.arange(width, device=self.device)).clamp(min=0)  # [N, T]
        subset = layout.subset(rows)
        chunk = max(1, PREFILL_POSITIONS // len(seqs))
        for begin in range(0, width, chunk):
            end = min(begin + chunk, width)
            window = catch_up_cache(state.cache, rows, start + begin, write[:, begin:end])
            hidden = self.forward(subset, ids[:, begin:end], mask[:, : start + end], positions[:, begin:end], window)
        state.hidden = state.hidden.index_copy(0, rows, hidden)
        lag.caught_up(seqs)

    # ---- scores ---------------------------------------------------------------------------------

    def expert_logits(self, state: BatchState) -> torch.Tensor:
        """[S, V] float32 logits of every sequence's expert row (its base row for the base decoder)."""
        return self.logits(state.hidden[state.layout.expert_row], state.layout.experts)

    def scores(self, state: BatchState, sampler: Sampler, expert: torch.Tensor) -> torch.Tensor:
        """[S, V] score of every sequence given its `expert_logits`: the CoLD score, or those logits
        for expert/base sequences.

        A CoLD sequence whose plausibility mask holds one token scores that token alone (its
        amateur's logits cannot change the choice); the others need their amateur, and a lagging
        one catches up first. Which sequences needed it is recorded in `state.amateur`, which
        also decides which amateurs run with the experts at the next step.
        """
        hidden, layout = state.hidden, state.layout
        if sampler.contrastive is None:
            return expert
        seqs = sampler.contrastive
        own = expert if sampler.every_contrastive else expert[seqs]  # the usual CoLD batch: no gather, no copy back
        threshold = scoring.plausibility_threshold(own, sampler.alpha)  # [C, 1]
        valid = own >= threshold  # [C, V]
        needed = valid.sum(dim=1) > 1  # [C]
        needs = dict(zip(sampler.contrastive_seqs, needed.tolist()))
        late = state.amateur.catch_up_seqs(needs)
        if late:
            self._catch_up(state, late)
            hidden = state.hidden
        state.amateur.observe(needs)
        if any(needs.values()):  # (a lagging amateur is caught up only where it is needed)
            # a sequence that needs no amateur is scored against its own expert row: one finite entry either way
            amateur_rows = torch.where(needed, layout.amateur_row[seqs], layout.expert_row[seqs])  # [C]
            score = self._contrastive_scores(hidden[amateur_rows], layout.subset(amateur_rows) if not _plain_head(self.model) else None,
                                             own, valid, sampler.beta, sampler.forms, sampler.schedules)
        else:  # every mask holds one token, chosen whatever the amateur says: no amateur logits at all
            score = own.masked_fill(~valid, scoring.NEG_INF)
        if sampler.every_contrastive:
            return score
        out = expert.clone()
        out[seqs] = score
        return out

    def _contrastive_scores(self, amateur_hidden, amateur_layout, expert, valid, beta, forms, schedules) -> torch.Tensor:
        """[C, V] CoLD scores of the contrastive sequences (expert logits [C, V], their
        plausibility mask `valid` [C, V], the amateur rows' hidden states [C, H]; `amateur_layout`:
        those rows' adapter selection where the output layer is adapted, None where it is plain).

        The logit-form score reads the amateur only inside the expert's plausibility mask, so with
        a plain (unadapted) output layer only the union of the masked-in columns is computed, for
        the amateur's logits and for the score itself; every other entry is -inf. (The jsd beta
        schedule reads the amateur's whole distribution, so its sequences take the full path.)
        """
        if set(forms) == {"logit"} and amateur_layout is None and "jsd" not in schedules:
            beta = scoring.scheduled_beta(beta, schedules, expert)  # [C]; entropy reads the full expert logits
            head = self.model.get_output_embeddings()
            columns = valid.any(dim=0).nonzero().squeeze(1)  # [K]
            own = expert[:, columns]  # [C, K]
            amateur = self._softcap((amateur_hidden @ head.weight[columns].T).float())  # [C, K]
            part = scoring.contrastive_scores(own, amateur, None, beta, "logit", valid[:, columns])
            return torch.full_like(expert, scoring.NEG_INF).index_copy_(1, columns, part)
        return scoring.contrastive_scores_by_form(expert, self.logits(amateur_hidden, amateur_layout), beta, forms, valid,
                                                  schedules)


def _plain_head(model) -> bool:
    """Whether the output layer is a plain matrix (no LoRA, no bias): then only masked-in columns are computed."""
    head = model.get_output_embeddings()
    return not isinstance(head, RowLoRALinear) and getattr(head, "bias", None) is None


def _kv_dtype(kv_dtype: str | torch.dtype | None, model) -> torch.dtype | None:
    """The KV cache's dtype (None: the model's own), checked against what the model can attend with."""
    if kv_dtype is None:
        return None
    wanted, own = pick_dtype(kv_dtype), next(model.parameters()).dtype
    if wanted == own:
        return None
    if getattr(model.config, "_attn_implementation", None) != GROUPED_ATTENTION:
        raise ColdError(
            f"kv_dtype {kv_dtype!r} differs from the model's dtype ({str(own).removeprefix('torch.')}), which needs "
            f"SDPA attention; this model uses {model.config._attn_implementation!r}: leave kv_dtype unset"
        )
    return wanted
